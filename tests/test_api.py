"""The Python API faces: register, benchmark (the seed's shape), request parsing."""

from __future__ import annotations

import numpy as np
import pytest

import optiserve
from optiserve.api import benchmark, parse_request
from optiserve.core.errors import ConfigError, ModelNotFound
from optiserve.optimizer.request import OptimizeRequest
from tests.builders import mlp_onnx, write_csv


@pytest.fixture
def mlp(sqlite_registry):
    return optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)


def _check_percentiles(results: dict, runs: int | None = None) -> None:
    for row in results.values():
        assert {"p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput", "runs"} <= set(row)
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput"] > 0
        if runs is not None:
            assert row["runs"] == runs


@pytest.mark.slow
def test_benchmark_seed_shape(sqlite_registry, mlp):
    out = benchmark("mlp", registry=sqlite_registry, batch_sizes=[4, 1], iterations=20, warmup=2)
    bench = out["benchmark"]
    assert set(bench) == {"iterations", "warmup_iterations", "batch_sizes", "results"}
    assert (bench["iterations"], bench["warmup_iterations"]) == (20, 2)
    assert bench["batch_sizes"] == [1, 4]
    assert list(bench["results"]) == ["batch_1", "batch_4"]
    _check_percentiles(bench["results"], runs=20)
    assert (out["model_id"], out["version"], out["format"], out["runtime"], out["threads"]) == \
        ("mlp", 1, "onnx", "onnxruntime", 1)


@pytest.mark.slow
def test_benchmark_by_version_and_time_cap(sqlite_registry, mlp):
    optiserve.register("mlp", mlp_onnx(seed=1), registry=sqlite_registry)
    out = benchmark("mlp:1", registry=sqlite_registry, batch_sizes=[2], iterations=10**7,
                    warmup=0, max_seconds=0.2)
    assert out["version"] == 1
    runs = out["benchmark"]["results"]["batch_2"]["runs"]
    assert 1 <= runs < 10**7  # stopped by max_seconds, and says how many calls it timed


@pytest.mark.slow
@pytest.mark.integration
def test_benchmark_sklearn_on_validation_data(sqlite_registry, logreg, breast_cancer, tmp_path):
    optiserve.register("bc", logreg, registry=sqlite_registry)
    path = write_csv(tmp_path / "v.csv", breast_cancer.X_val, breast_cancer.y_val)
    out = benchmark("bc", registry=sqlite_registry, batch_sizes=[1, 16], iterations=10, warmup=1,
                    dataset={"source": "file", "path": str(path), "label_column": "target"})
    assert out["runtime"] == "sklearn" and out["format"] == "pkl"
    _check_percentiles(out["benchmark"]["results"], runs=10)


@pytest.mark.parametrize("sizes", [[0], [], [1, -2]])
def test_benchmark_rejects_bad_batch_sizes(sqlite_registry, mlp, sizes):
    with pytest.raises(ConfigError):
        benchmark("mlp", registry=sqlite_registry, batch_sizes=sizes, iterations=1, warmup=0)


def test_benchmark_unknown_model(sqlite_registry, mlp):
    with pytest.raises(ModelNotFound, match="Known models: mlp"):
        benchmark("other", registry=sqlite_registry, batch_sizes=[1], iterations=1, warmup=0)


def test_register_uses_environment_registry_by_default(optiserve_home):
    info = optiserve.register("env-default", mlp_onnx())
    assert (optiserve_home / "registry.db").is_file()
    assert info.uri.startswith(str((optiserve_home / "artifacts").resolve()))
    reg = optiserve.Registry()
    try:
        assert reg.get("env-default").sha256 == info.sha256
    finally:
        reg.close()


def test_parse_request_passes_models_through_and_explains_errors():
    req = OptimizeRequest(model_id="m")
    assert parse_request(req) is req
    with pytest.raises(ConfigError, match="Request field 'model_id'"):
        parse_request({"optimizations": ["quantization"]})
    with pytest.raises(ConfigError, match="Request field 'validation_dataset'"):
        parse_request({"model_id": "m", "validation_dataset": {"source": "sql"}})
    with pytest.raises(ConfigError, match="iterations"):
        parse_request({"model_id": "m", "iterations": 0})


@pytest.mark.slow
def test_optimize_with_request_object(sqlite_registry, mlp):
    req = OptimizeRequest(model_id="mlp", optimizations=["quantization"],
                          quantization_config={"method": "dynamic", "per_channel": True}, accuracy_threshold=0.9,
                          iterations=5, warmup=0)
    result = optiserve.optimize(registry=sqlite_registry, request=req)
    assert result.status == "completed"
    assert [c.artifact.label for c in result.candidates] == ["quantization(method=dynamic, per_channel=True)"]
    assert np.isclose(result.threshold, 0.9)
