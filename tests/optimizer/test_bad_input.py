"""Bad requests fail with the right error class and leave the registry as it was."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

import optiserve
from optiserve.api import parse_request
from optiserve.core.errors import (
    ConfigError, DatasetError, ModelNotFound, OptimizationTimeout, OptiserveError,
    SignatureMismatchError, SQLRefusedError, UnknownNameError,
)
from optiserve.registry.tables import RunRow
from tests.builders import files_under, linear_onnx, write_csv
from tests.optimizer.fakes import PinnedOptimizer


@pytest.fixture
def linear(sqlite_registry, tmp_path):
    """A 4-feature ONNX model and a CSV that fits it (label 'target')."""
    optiserve.register("lin", linear_onnx(4, 3), registry=sqlite_registry)
    rng = np.random.default_rng(0)
    csv_ok = write_csv(tmp_path / "ok.csv", rng.standard_normal((30, 4)), rng.integers(0, 3, 30))
    csv_wide = write_csv(tmp_path / "wide.csv", rng.standard_normal((30, 5)),
                         rng.integers(0, 3, 30))
    return {"ok": str(csv_ok), "wide": str(csv_wide)}


def _state(registry) -> tuple:
    models = [(m.name, [(v.version, v.status) for v in m.versions]) for m in registry.models()]
    return models, files_under(registry.store.root)


def _runs(registry) -> int:
    with registry.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(RunRow))


BAD_REQUESTS = [
    pytest.param(UnknownNameError, {"optimizations": ["prune"]}, id="unknown-pass"),
    pytest.param(ConfigError, {"quantization_config": {"bits": 4}}, id="unknown-option"),
    pytest.param(ConfigError, {"optimizations": ["quantization"],
                               "pass_configs": {"quantization": {"method": "fp4"}}},
                 id="bad-option-value"),
    pytest.param(ConfigError, {"optimizations": ["auto"], "quantization_config": {
        "activation_type": "qint8", "weight_type": "quint8"}}, id="uncombinable-options"),
    pytest.param(ConfigError, {"accuracy_threshold": 1.5}, id="threshold-1.5"),
    pytest.param(ConfigError, {"accuracy_threshold": 0}, id="threshold-0"),
    pytest.param(ConfigError, {"batch_sizes": [0]}, id="batch-size-0"),
    pytest.param(ConfigError, {"speed": "max"}, id="unknown-field"),
    pytest.param(DatasetError, {"validation_dataset": {"source": "file", "path": "{ok}",
                                                       "label_column": "churned"}},
                 id="missing-label-column"),
    pytest.param(SQLRefusedError, {"validation_dataset": {
        "source": "sql", "query": "DELETE FROM ml_features.customer_churn"}}, id="not-select"),
    pytest.param(SignatureMismatchError, {"validation_dataset": {
        "source": "file", "path": "{wide}", "label_column": "target"}}, id="signature-mismatch"),
    pytest.param(UnknownNameError, {"validation_dataset": {
        "source": "sql", "query": "SELECT 1", "data_source": "warehouse"}},
        id="unknown-data-source"),
    pytest.param(ModelNotFound, {"model_id": "nope"}, id="unknown-model"),
]


@pytest.mark.slow
@pytest.mark.parametrize("error, fields", BAD_REQUESTS)
def test_bad_input_leaves_registry_unchanged(sqlite_registry, linear, error, fields):
    before = _state(sqlite_registry)
    body = {"model_id": "lin", "iterations": 5, "warmup": 0, **fields}
    if "validation_dataset" in body and "path" in body["validation_dataset"]:
        body["validation_dataset"]["path"] = body["validation_dataset"]["path"].format(**linear)
    with pytest.raises(error):
        optiserve.optimize(registry=sqlite_registry, request=body)
    assert _state(sqlite_registry) == before
    assert sqlite_registry.get("lin").version == 1


def test_unknown_field_error_names_the_field():
    with pytest.raises(ConfigError, match="Request field 'speed'"):
        parse_request({"model_id": "m", "speed": "max"})


@pytest.mark.parametrize("fields", [{"optimizations": ["prune"]},
                                    {"quantization_config": {"bits": 4}}])
def test_unknown_pass_or_option_fails_before_any_work(sqlite_registry, linear, fields):
    request = parse_request({"model_id": "lin", "iterations": 5, "warmup": 0, **fields})
    optimizer = PinnedOptimizer(sqlite_registry, request)
    with pytest.raises(OptiserveError):
        optimizer.run()
    assert optimizer.measured == []
    assert _runs(sqlite_registry) == 0


def _timed_out_registry(monkeypatch):
    from optiserve.core.settings import load_settings
    from optiserve.registry import Registry

    monkeypatch.setenv("OPTIMIZATION_MAX_TIME_MINUTES", "0.000001")  # ~60 microseconds
    return Registry(load_settings(threads=1))


@pytest.mark.slow
def test_time_limit_before_any_candidate_registers_nothing(monkeypatch):
    registry = _timed_out_registry(monkeypatch)
    try:
        optiserve.register("lin", linear_onnx(), registry=registry)
        with pytest.raises(OptiserveError, match="OPTIMIZATION_MAX_TIME_MINUTES"):
            optiserve.optimize("lin", registry=registry, optimizations=["quantization"],
                               iterations=2, warmup=0)
        assert [v.version for v in registry.models()[0].versions] == [1]
    finally:
        registry.close()


@pytest.mark.slow
def test_time_limit_before_any_candidate_is_a_timeout(monkeypatch):
    registry = _timed_out_registry(monkeypatch)
    try:
        optiserve.register("lin", linear_onnx(), registry=registry)
        with pytest.raises(OptimizationTimeout):
            optiserve.optimize("lin", registry=registry, optimizations=["quantization"],
                               iterations=2, warmup=0)
    finally:
        registry.close()


@pytest.mark.slow
def test_onnx_pass_before_conversion_is_skipped_not_crashed(sqlite_registry, tmp_path):
    """Passes that need ONNX skip non-ONNX nodes whatever order they were asked in."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x = np.random.default_rng(0).standard_normal((60, 4))
    est = sklearn.LinearRegression().fit(x, x @ np.arange(4.0))
    optiserve.register("lin", est, registry=sqlite_registry)
    result = optiserve.optimize("lin", registry=sqlite_registry,
                                optimizations=["quantization", "onnx_conversion"],
                                accuracy_threshold=0.9, iterations=5, warmup=1)
    assert [c.artifact.label for c in result.candidates] == ["onnx_conversion"]
    assert any("quantization skipped on original: it works on ONNX" in n for n in result.notes)
    # no labels: a regressor is compared with R² against the original, not a sign test
    assert result.original.evaluation.metric == "r2_vs_original"


def test_empty_validation_data_is_a_dataset_error(sqlite_registry, linear, tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 4), np.float32))
    with pytest.raises(DatasetError, match="no rows"):
        optiserve.optimize("lin", registry=sqlite_registry, optimizations=["quantization"],
                           validation_dataset={"source": "file", "path": str(path)})


def test_benchmark_needs_one_timed_call(sqlite_registry, linear):
    with pytest.raises(ConfigError, match="iterations=0"):
        optiserve.benchmark("lin", registry=sqlite_registry, iterations=0)


@pytest.mark.slow
def test_time_limit_after_a_candidate_keeps_it_with_status_timeout(sqlite_registry):
    """The best candidate so far is kept and registered; the status says the search was cut."""
    from optiserve.api import parse_request
    from optiserve.optimizer.pipeline import Optimizer

    optiserve.register("lin", linear_onnx(), registry=sqlite_registry)
    request = parse_request({"model_id": "lin", "iterations": 5, "warmup": 1,
                             "optimizations": ["graph_optimization", "quantization"]})
    optimizer = Optimizer(sqlite_registry, request,
                          on_candidate=lambda cand: setattr(optimizer, "deadline", 0))
    result = optimizer.run()
    assert result.status == result.response["status"] == "timeout"
    assert [c.artifact.label for c in result.candidates] == ["graph_optimization"]
    assert any("OPTIMIZATION_MAX_TIME_MINUTES" in n for n in result.notes)
    assert result.version.status == "ready" and result.version.version == 2
    assert sqlite_registry.runs.get(result.run_id)["status"] == "timeout"
