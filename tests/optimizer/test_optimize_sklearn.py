"""End to end on scikit-learn: the seed's request and response shape, lineage in the registry."""

from __future__ import annotations

import re

import numpy as np
import pytest

import optiserve
from optiserve.data.sources import DatasetSpec, read
from optiserve.data.demo_source import FEATURES, LABEL
from tests.builders import write_csv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_KEYS = {"optimization_id", "status", "original", "optimized", "improvement", "artifact_id"}
SUMMARY_KEYS = {"format", "size_mb", "latency_ms", "accuracy"}
IMPROVEMENT_KEYS = {"size_reduction", "latency_reduction", "accuracy_change"}
PERCENT = re.compile(r"^-?\d+\.\d%$")
CHANGE = re.compile(r"^(?:[+-]\d+\.\d{3}|0\.000)$")


def _check_seed_shape(response: dict) -> None:
    assert set(response) == SEED_KEYS
    assert set(response["original"]) == SUMMARY_KEYS == set(response["optimized"])
    assert set(response["improvement"]) == IMPROVEMENT_KEYS
    assert PERCENT.match(response["improvement"]["size_reduction"])
    assert PERCENT.match(response["improvement"]["latency_reduction"])
    assert CHANGE.match(response["improvement"]["accuracy_change"])


@pytest.fixture
def forest_version(sqlite_registry, forest):
    return optiserve.register("bc", forest, registry=sqlite_registry)


def test_forest_with_csv_validation(sqlite_registry, forest, forest_version, breast_cancer,
                                    tmp_path):
    csv_path = write_csv(tmp_path / "val.csv", breast_cancer.X_val, breast_cancer.y_val)
    result = optiserve.optimize(
        "bc", registry=sqlite_registry, iterations=20, warmup=2,
        validation_dataset={"source": "file", "path": str(csv_path), "label_column": "target"})
    response = result.response
    _check_seed_shape(response)
    assert response["status"] == "completed"
    assert response["original"]["format"] == "pkl" and response["optimized"]["format"] == "onnx"

    # The original's accuracy is scikit-learn's own on the validation rows.
    expected_acc = float((forest.predict(breast_cancer.X_val) == breast_cancer.y_val).mean())
    assert response["original"]["accuracy"] == round(expected_acc, 4)
    change = response["optimized"]["accuracy"] - response["original"]["accuracy"]
    assert response["improvement"]["accuracy_change"] == (
        f"{change:+.3f}" if round(change, 3) else "0.000")

    # A new version, child of version 1, with the chain of passes that made it.
    latest = sqlite_registry.get("bc")
    assert latest.version == 2 and latest.parent == 1 and latest.status == "ready"
    assert latest.format == "onnx" and response["artifact_id"] == latest.artifact_id == "bc-v2"
    assert [p["name"] for p in latest.passes] == ["onnx_conversion"]
    assert latest.metrics["accuracy"] == pytest.approx(response["optimized"]["accuracy"],
                                                      abs=5e-5)
    assert "keeps the required" in latest.metrics["gate"]
    size_cut = (1 - latest.size_bytes / forest_version.size_bytes) * 100
    assert response["improvement"]["size_reduction"] == f"{size_cut:.1f}%"

    details = result.details()["details"]
    assert details["threshold"] == 0.99 and details["metric"] == "accuracy"
    assert details["original"]["n"] == len(breast_cancer.y_val)
    # Quantization (a default pass) has nothing to do on trees; the report says so.
    assert any("quantization skipped" in n and "TreeEnsembleClassifier" in n
               for n in details["notes"])
    run = sqlite_registry.runs.get(response["optimization_id"])
    assert run["status"] == "completed" and run["report"]["status"] == "completed"
    assert run["report"]["details"]["version"] == 2


def test_seed_request_on_the_demo_churn_table(sqlite_registry, settings):
    from sklearn.ensemble import RandomForestClassifier

    query = "SELECT * FROM ml_features.customer_churn LIMIT 1000"
    train = read(DatasetSpec(source="sql",
                             query="SELECT * FROM ml_features.customer_churn LIMIT 3000 "
                                   "OFFSET 1000"), settings)
    X = np.column_stack([train[c] for c in FEATURES])
    model = RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0).fit(
        X, train[LABEL])
    optiserve.register("churn", model, registry=sqlite_registry)
    # The seed's body, as the REST API receives it.
    result = optiserve.optimize(registry=sqlite_registry, request={
        "model_id": "churn",
        "optimizations": ["onnx_conversion", "quantization"],
        "quantization_config": {"method": "dynamic", "precision": "int8"},
        "validation_dataset": {"source": "sql", "query": query, "label_column": LABEL},
        "accuracy_threshold": 0.99,
        "iterations": 20, "warmup": 2,
    })
    _check_seed_shape(result.response)
    assert result.response["status"] == "completed"
    assert result.details()["details"]["original"]["n"] == 1000
    assert result.details()["details"]["dataset"] == f"sql: {query}"
    assert 0.5 < result.response["original"]["accuracy"] <= 1.0
