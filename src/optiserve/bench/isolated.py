"""Time runtimes in a fresh Python process.

Runtimes in one process disturb each other: torch's OpenMP workers keep spinning after a call
and steal cores from ONNX Runtime timed next. So every timing the optimizer trusts runs in a
child process (`python -m optiserve.bench.worker TASK job.json`): `latency` times one
candidate alone at each batch size and yields its peak memory (`benchmark_isolated`); `turns`
times several ONNX files one call each in turn (`time_in_turns`, for structured pruning's
choice of layers: on a shared machine two models timed a second apart differ by 30 %, taking
turns by 2 %).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.bench.latency import Latency
from optiserve.core.errors import OptiserveError
from optiserve.core.types import Signature


def in_child(task: str, job: dict[str, Any], arrays: dict[str, np.ndarray], *, what: str,
             timeout_s: float, hint: str) -> dict[str, Any]:
    """Run one task of bench/worker.py in a fresh process on `arrays`; its JSON answer.
    `what` names the work in errors ("Benchmarking model.onnx"); `hint` is the fix when it
    takes longer than `timeout_s`."""
    with tempfile.TemporaryDirectory(prefix="optiserve-bench-") as tmp:
        np.savez(Path(tmp) / "arrays.npz", **arrays)
        job = {**job, "arrays": str(Path(tmp) / "arrays.npz")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", "optiserve.bench.worker", task,
                                   str(Path(tmp) / "job.json")], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise OptiserveError(f"{what} took longer than {timeout_s:.0f} s.",
                                 hint=hint) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OptiserveError(f"{what} in a separate process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_isolated(path: Path, signature: Signature, *, format: str, threads: int,
                       inputs: dict[int, dict[str, np.ndarray]], warmup: int, iterations: int,
                       max_seconds: float | None, outputs: list[str] | None = None,
                       timeout_s: float = 900) -> tuple[dict[int, Latency], float]:
    """Latency per batch size and the child's peak RSS in MB."""
    arrays = {f"{bs}::{name}": a for bs, batch in inputs.items() for name, a in batch.items()}
    job = {"path": str(path), "format": format, "threads": threads, "warmup": warmup,
           "iterations": iterations, "max_seconds": max_seconds, "outputs": outputs,
           "signature": signature.model_dump(mode="json"), "batch_sizes": sorted(inputs)}
    result = in_child("latency", job, arrays, what=f"Benchmarking {path.name}",
                      timeout_s=timeout_s, hint="Lower --iterations or the batch sizes.")
    latency = {int(bs): Latency(**r) for bs, r in result["latency"].items()}
    return latency, result["peak_rss_mb"]


def time_in_turns(paths: list[Path], signature: Signature, rows: dict[str, np.ndarray], *,
                  threads: int, timeout_s: float = 300, hint: str = "") -> list[float]:
    """p50 ms of each ONNX file on `rows`, timed one call of each in turn in one child."""
    job = {"paths": [str(p) for p in paths], "threads": threads,
           "signature": signature.model_dump(mode="json")}
    return in_child("turns", job, rows, what="Timing the models in ONNX Runtime",
                    timeout_s=timeout_s, hint=hint)["p50_ms"]
