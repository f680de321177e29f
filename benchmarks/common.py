"""Shared helpers for the benchmark scripts: timing, sentence pool, temp optiserve home, output.

Nothing here imports torch: ONNX Runtime variants are measured in processes that never load it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
THREADS = 2


# -- timing ---------------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], *, batch_size: int, warmup: int = 20,
               iterations: int = 200, max_seconds: float = 10.0,
               warmup_max_seconds: float = 3.0) -> dict[str, float]:
    """optiserve's own timer (bench.latency.measure), so peers and candidates are timed alike:
    `warmup` untimed calls (cut short after `warmup_max_seconds`), then up to `iterations`
    timed calls or `max_seconds`."""
    from optiserve.bench.latency import measure

    r = measure(fn, batch_size=batch_size, warmup=warmup, iterations=iterations,
                max_seconds=max_seconds, warmup_max_seconds=warmup_max_seconds)
    return {**r.as_dict(), "items_per_s": r.throughput}


def ort_session(path: str | Path, threads: int = THREADS):
    """The ONNX Runtime session every ORT variant uses: CPU EP, `threads` intra-op threads,
    1 inter-op thread, sequential execution, all graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# -- optiserve in a throwaway home --------------------------------------------------------
def temp_registry(workdir: Path):
    """A Registry under a fresh OPTISERVE_HOME inside `workdir` (never the repo's .optiserve)."""
    home = Path(tempfile.mkdtemp(prefix="optiserve-home-", dir=workdir))
    os.environ["OPTISERVE_HOME"] = str(home)
    os.environ["OPTISERVE_THREADS"] = str(THREADS)
    from optiserve import Registry, load_settings

    return Registry(load_settings())


# -- files ----------------------------------------------------------------------------------
def file_mb(*paths: str | Path) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 1e6


def onnx_total_mb(path: str | Path) -> float:
    """Size of an .onnx file plus the external-data files it references."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            extra.add(ExternalDataInfo(t).location)
    return file_mb(path, *(path.parent / e for e in sorted(extra)))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "threads_used": THREADS}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def _cpu_times() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields), idle


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` (call it while this script is idle: what it
    measures is other processes). None where /proc/stat is missing."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except OSError:
        return None
    return 0.0 if t1 == t0 else 1.0 - (i1 - i0) / (t1 - t0)


def wait_for_quiet(limit_s: float = 20.0, busy_max: float = 0.15) -> dict[str, Any]:
    """Before a timed stage: measure how busy the machine is with other work; wait (up to
    `limit_s`) for it to calm down. The result is recorded next to the numbers."""
    t0 = time.perf_counter()
    busy = cpu_busy()
    while busy is not None and busy > busy_max and time.perf_counter() - t0 < limit_s:
        busy = cpu_busy()
    return {"other_cpu_busy": None if busy is None else round(busy, 3),
            "waited_s": round(time.perf_counter() - t0, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def run_stage(script: Path, *args: str, log: Path | None = None,
              timeout: float = 600) -> dict[str, Any]:
    """Run `python script *args` in a fresh interpreter (fresh thread pools), its output going
    to `log` (shown if it fails) or to this terminal. Returns its wall
    seconds and `other_cpu_busy`: the share of the machine's CPU time used by processes other
    than this stage while it ran (from /proc/stat minus the child's own CPU time); a high value
    means the timings were taken on a contended machine."""
    import resource

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        c0 = _cpu_times()
    except OSError:
        c0 = None
    t0 = time.perf_counter()
    if log is None:
        proc = subprocess.run([sys.executable, str(script), *args], env=env, timeout=timeout)
    else:
        with open(log, "ab") as f:
            proc = subprocess.run([sys.executable, str(script), *args], env=env,
                                  timeout=timeout, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        if log is not None:
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"stage {' '.join(args)} failed with exit code {proc.returncode}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    other = None
    if c0 is not None:
        c1 = _cpu_times()
        hz = os.sysconf("SC_CLK_TCK")
        total, idle = (c1[0] - c0[0]) / hz, (c1[1] - c0[1]) / hz
        other = max(0.0, (total - idle - child) / total) if total else 0.0
    return {"seconds": round(wall, 1), "stage_cpu_s": round(child, 1),
            "other_cpu_busy": None if other is None else round(other, 3)}


def stage(script: Path, args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """run_stage, with a failure or a time-out recorded ({"error": ...}) instead of ending the
    whole benchmark."""
    try:
        return run_stage(script, *args, log=log, timeout=timeout)
    except SystemExit as exc:
        return {"error": str(exc)}
    except subprocess.TimeoutExpired:
        return {"error": f"stage {' '.join(args[:4])} ran past {timeout:.0f} s"}


# -- the sentence pool ----------------------------------------------------------------------
def sentence_pool(n_total: int = 350, seed: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """The demo's sentence pool (optiserve.demo.sentences), with each sentence's source."""
    from optiserve.demo.sentences import sentence_pool as pool

    sentences, where = pool(n_total, seed)
    return sentences, [{"text": s, "source": w} for s, w in zip(sentences, where)]


def print_kv(console, title: str, rows: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        t.add_row(str(k), str(v))
    console.print(t)


def merge_results(previous: dict | None, fresh: dict[str, dict]) -> dict[str, dict]:
    """A partial run's rows merged into the results of earlier runs: rows measured now replace
    theirs, the others are kept and marked `earlier_run`, and a variant that failed now drops
    its earlier row (an old number must not stand for code that no longer runs)."""
    out = {m: dict(e) for m, e in ((previous or {}).get("models") or {}).items()}
    for entry in out.values():
        for row in entry.get("variants", {}).values():
            row["earlier_run"] = True
    for model, entry in fresh.items():
        old = out.get(model, {})
        merged = {**old, **{k: v for k, v in entry.items() if k not in ("variants", "errors")}}
        merged["variants"] = {**old.get("variants", {}), **entry["variants"]}
        merged["errors"] = {**{k: e for k, e in old.get("errors", {}).items()
                               if k not in entry["variants"]}, **entry["errors"]}
        for v in entry["errors"]:  # a failure now voids an earlier row of the same variant
            merged["variants"].pop(v, None)
        out[model] = merged
    return out


def pick_names(text: str, known, what: str) -> list[str]:
    """The comma-separated names of a --models/--variants option, each one of `known`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return names
