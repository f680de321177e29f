"""Latency measurement: percentiles, warmup, the time cap and the seed's JSON."""

from __future__ import annotations

import pytest

from optiserve.bench.latency import Latency, benchmark_runtime, measure, seed_json


class CountingRuntime:
    """A runtime fake: counts calls and remembers the batch sizes it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.sizes: list[int] = []

    def predict(self, inputs, outputs=None):
        self.calls += 1
        self.sizes.append(len(inputs["x"]))
        return {"y": inputs["x"]}


def test_measure_counts_warmup_and_iterations():
    calls = []
    lat = measure(lambda: calls.append(1), batch_size=4, warmup=3, iterations=7)
    assert len(calls) == 10 and lat.runs == 7 and lat.batch_size == 4
    assert 0 <= lat.p50_ms <= lat.p95_ms <= lat.p99_ms
    assert lat.throughput > 0


def test_benchmark_runtime_per_batch_size():
    runtime = CountingRuntime()
    progress = []
    results = benchmark_runtime(runtime, lambda bs: {"x": list(range(bs))}, [1, 8], warmup=1,
                                iterations=5, progress=progress.append)
    assert sorted(results) == [1, 8] and progress == [1, 8]
    assert runtime.calls == 12 and runtime.sizes == [1] * 6 + [8] * 6
    assert results[8].batch_size == 8


def test_seed_json_shape_and_rounding():
    results = {16: Latency(16, 5, 2.123456, 3.0, 4.0, 2.5, 6400.0),
               1: Latency(1, 5, 1.0, 1.5, 1.9, 1.1, 900.0)}
    out = seed_json(results, iterations=5, warmup=1)
    assert out == {"benchmark": {
        "iterations": 5, "warmup_iterations": 1, "batch_sizes": [1, 16],
        "results": {
            "batch_1": {"runs": 5, "p50_ms": 1.0, "p95_ms": 1.5, "p99_ms": 1.9, "mean_ms": 1.1,
                        "throughput": 900.0},
            "batch_16": {"runs": 5, "p50_ms": 2.1235, "p95_ms": 3.0, "p99_ms": 4.0,
                         "mean_ms": 2.5, "throughput": 6400.0},
        }}}


def test_failure_in_predict_propagates():
    def boom():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        measure(boom, batch_size=1, warmup=0, iterations=3)
