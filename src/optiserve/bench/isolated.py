"""Time a runtime in a fresh Python process.

Runtimes in one process disturb each other: torch's OpenMP workers keep spinning after a call
and steal cores from ONNX Runtime timed next. Each candidate is therefore timed alone in a
child process (`python -m optiserve.bench.worker`), which also yields its peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from optiserve.bench.latency import Latency
from optiserve.core.errors import OptiserveError
from optiserve.core.types import Signature


def benchmark_isolated(path: Path, signature: Signature, *, format: str, threads: int,
                       inputs: dict[int, dict[str, np.ndarray]], warmup: int, iterations: int,
                       max_seconds: float | None, outputs: list[str] | None = None,
                       timeout_s: float = 900) -> tuple[dict[int, Latency], float]:
    """Latency per batch size and the child's peak RSS in MB."""
    with tempfile.TemporaryDirectory(prefix="optiserve-bench-") as tmp:
        arrays = {f"{bs}::{name}": a for bs, batch in inputs.items() for name, a in batch.items()}
        np.savez(Path(tmp) / "inputs.npz", **arrays)
        job = {"path": str(path), "format": format, "threads": threads, "warmup": warmup,
               "iterations": iterations, "max_seconds": max_seconds, "outputs": outputs,
               "signature": signature.model_dump(mode="json"), "batch_sizes": sorted(inputs),
               "inputs": str(Path(tmp) / "inputs.npz")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", "optiserve.bench.worker",
                                   str(Path(tmp) / "job.json")], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise OptiserveError(f"Benchmarking {path.name} took longer than {timeout_s:.0f} s.",
                                 hint="Lower --iterations or the batch sizes.") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OptiserveError(f"Benchmarking {path.name} in a separate process failed: {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    latency = {int(bs): Latency(**r) for bs, r in result["latency"].items()}
    return latency, result["peak_rss_mb"]
