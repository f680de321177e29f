"""The gate decides: a run where no candidate passes keeps the closest as a rejected version;
the choice among passing candidates is by speed over the batch sizes."""

from __future__ import annotations

import pytest

import optiserve
from optiserve.api import parse_request
from optiserve.core.errors import GateFailedError
from optiserve.server.errors import http_status
from tests.builders import mlp_onnx
from tests.optimizer.fakes import PinnedOptimizer

pytestmark = pytest.mark.slow

PT = "quantization(method=dynamic, per_channel=False)"
PC = "quantization(method=dynamic, per_channel=True)"


@pytest.fixture
def mlp(registry):
    return optiserve.register("mlp", mlp_onnx(), registry=registry)


def test_threshold_one_rejects_quantization(registry, mlp):
    progress: list[str] = []
    with pytest.raises(GateFailedError) as info:
        optiserve.optimize("mlp", registry=registry, optimizations=["quantization"],
                           accuracy_threshold=1.0, iterations=20, warmup=2,
                           progress=lambda msg, frac: progress.append(msg))
    err = info.value
    assert http_status(err) == 422
    report = err.report
    assert report.status == "rejected"
    assert report.original.evaluation.metric == "cosine_mean"  # no validation data
    assert all(not c.gate.passed for c in report.candidates)
    assert all(c.evaluation.value < 1.0 for c in report.candidates)
    assert report.chosen is max(report.candidates, key=lambda c: c.gate.ratio)
    assert "kept as rejected version 2" in str(err)

    rejected = registry.get("mlp", 2)
    assert rejected.status == "rejected" and rejected.parent == 1
    assert rejected.passes[0]["name"] == "quantization"
    assert registry.get("mlp").version == 1  # users still get the original
    assert registry.runs.get(report.run_id)["status"] == "rejected"
    assert registry.runs.get(report.run_id)["report"]["status"] == "rejected"
    assert any("measuring the original" in m for m in progress)


def _run(registry, request: dict, **pins):
    body = {"model_id": "mlp", "optimizations": ["quantization"], "iterations": 3, "warmup": 0,
            "quantization_config": {"method": "dynamic"}, **request}
    return PinnedOptimizer(registry, parse_request(body), **pins).run()


def test_fastest_passing_candidate_is_chosen(sqlite_registry):
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    result = _run(sqlite_registry, {"accuracy_threshold": 0.9},
                  latencies={PT: {1: 1.0}, PC: {1: 2.0}})
    assert result.chosen.artifact.label == PT
    assert sqlite_registry.get("mlp").passes[0]["set"] == {"method": "dynamic", "per_channel": False}


def test_faster_candidate_that_fails_the_gate_is_not_chosen(sqlite_registry):
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    result = _run(sqlite_registry, {"accuracy_threshold": 0.9},
                  latencies={PT: {1: 1.0}, PC: {1: 2.0}}, metric={PT: 0.5})
    assert result.status == "completed"
    assert not result.candidates[0].gate.passed
    assert result.chosen.artifact.label == PC
    assert result.response["optimized"]["latency_ms"] == 2.0


def test_fastest_over_all_batch_sizes_wins(sqlite_registry):
    """The choice is the best geometric mean over batch sizes of p50 / best p50 at that size:
    PT is 10 % faster at batch 1 but 2x slower at batch 8, so PC wins; latency_ms is still
    reported at the first batch size."""
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    result = _run(sqlite_registry, {"accuracy_threshold": 0.9, "batch_sizes": [1, 8]},
                  latencies={PT: {1: 1.0, 8: 10.0}, PC: {1: 1.1, 8: 5.0}})
    assert result.chosen.artifact.label == PC
    assert result.response["optimized"]["latency_ms"] == 1.1


def test_one_batch_size_is_plain_p50_order(sqlite_registry):
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    result = _run(sqlite_registry, {"accuracy_threshold": 0.9, "batch_sizes": [8]},
                  latencies={PT: {8: 10.0}, PC: {8: 5.0}})
    assert result.chosen.artifact.label == PC
