"""Child process of bench.isolated: run one timing task, print one JSON line.

    python -m optiserve.bench.worker latency|turns JOB.json
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    """This process's own peak RSS. ru_maxrss would include the parent's peak (Linux keeps it
    across fork + exec); VmHWM belongs to the address space made at exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency(job: dict) -> dict:
    """One artifact timed alone at each batch size, and this process's peak memory."""
    from optiserve.bench.latency import benchmark_runtime
    from optiserve.core.types import Signature
    from optiserve.runtimes.base import load_runtime

    with np.load(job["arrays"]) as data:
        inputs: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            bs, name = key.split("::", 1)
            inputs.setdefault(int(bs), {})[name] = data[key]
    runtime = load_runtime(job["path"], Signature.model_validate(job["signature"]),
                           format=job["format"], threads=job["threads"])
    with runtime:
        results = benchmark_runtime(runtime, inputs.__getitem__, job["batch_sizes"],
                                    warmup=job["warmup"], iterations=job["iterations"],
                                    max_seconds=job["max_seconds"], outputs=job["outputs"])
    return {"latency": {bs: r.__dict__ for bs, r in results.items()},
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def turns(job: dict, max_seconds: float = 2.0, rounds: int = 300) -> dict:
    """ONNX files timed one call of each in turn, for up to `rounds` rounds or `max_seconds`
    (at least 20 rounds); the median of each."""
    from optiserve.core.types import Signature
    from optiserve.runtimes.base import load_runtime

    sig = Signature.model_validate(job["signature"])
    with np.load(job["arrays"]) as data:
        rows = {k: data[k] for k in data.files}
    with contextlib.ExitStack() as stack:
        runtimes = [stack.enter_context(load_runtime(Path(p), sig, format="onnx",
                                                     threads=job["threads"]))
                    for p in job["paths"]]
        for runtime in runtimes:
            for _ in range(10):
                runtime.predict(rows)
        times: list[list[float]] = [[] for _ in runtimes]
        until = time.perf_counter() + max_seconds
        for r in range(rounds):
            if r >= 20 and time.perf_counter() > until:
                break
            for runtime, spent in zip(runtimes, times):
                start = time.perf_counter()
                runtime.predict(rows)
                spent.append(time.perf_counter() - start)
    return {"p50_ms": [float(np.median(t)) * 1e3 for t in times]}


TASKS = {"latency": latency, "turns": turns}

if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        print(json.dumps(TASKS[sys.argv[1]](json.load(f))))
