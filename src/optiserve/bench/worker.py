"""Child process of bench.isolated: load one artifact, time it, print one JSON line."""

from __future__ import annotations

import json
import resource
import sys

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


def main(job_path: str) -> None:
    from optiserve.bench.latency import benchmark_runtime
    from optiserve.core.types import Signature
    from optiserve.runtimes.base import load_runtime

    with open(job_path) as f:
        job = json.load(f)
    with np.load(job["inputs"]) as data:
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
    peak_mb = _peak_rss_mb()
    print(json.dumps({"latency": {bs: r.__dict__ for bs, r in results.items()},
                      "peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main(sys.argv[1])
