"""Measure a runtime's latency the same way for every candidate and every framework.

Each call is timed with perf_counter after `warmup` untimed calls; `max_seconds` caps one batch
size so a slow baseline cannot eat the optimization's time budget (the run count is reported).
Threads are pinned by the runtime (intra-op = settings.threads) and stated in the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Latency:
    batch_size: int
    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure(fn: Callable[[], object], *, batch_size: int, warmup: int, iterations: int,
            max_seconds: float | None = None,
            warmup_max_seconds: float | None = None) -> Latency:
    """`warmup` untimed calls (at least 2 once `warmup_max_seconds` has passed), then up to
    `iterations` timed calls or `max_seconds`."""
    t_start = time.perf_counter()
    for done in range(1, warmup + 1):
        fn()
        if warmup_max_seconds is not None and done >= 2 \
                and time.perf_counter() - t_start > warmup_max_seconds:
            break
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    ms = np.asarray(times) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return Latency(batch_size, len(ms), float(p50), float(p95), float(p99), float(ms.mean()),
                   float(batch_size * len(ms) / (ms.sum() / 1000)))


def benchmark_runtime(runtime, take: Callable[[int], dict], batch_sizes: Iterable[int], *,
                      warmup: int, iterations: int, max_seconds: float | None = None,
                      outputs: list[str] | None = None, progress=None) -> dict[int, Latency]:
    """Latency of `runtime.predict` per batch size, on inputs from take(batch_size)."""
    results = {}
    for bs in batch_sizes:
        inputs = take(bs)
        results[bs] = measure(lambda: runtime.predict(inputs, outputs), batch_size=bs,
                              warmup=warmup, iterations=iterations, max_seconds=max_seconds)
        if progress:
            progress(bs)
    return results


def seed_json(results: dict[int, Latency], *, iterations: int, warmup: int) -> dict:
    """The seed's benchmark shape: {"benchmark": {..., "results": {"batch_N": {...}}}}."""
    return {"benchmark": {
        "iterations": iterations,
        "warmup_iterations": warmup,
        "batch_sizes": sorted(results),
        "results": {f"batch_{bs}": {k: v for k, v in r.as_dict().items() if k != "batch_size"}
                    for bs, r in sorted(results.items())},
    }}
