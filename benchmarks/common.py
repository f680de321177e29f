"""Shared helpers for the benchmark scripts: timing, sentence pool, temp optiserve home, output.

Nothing here imports torch: ONNX Runtime variants are measured in processes that never load it.
"""

from __future__ import annotations

import json
import os
import platform
import re
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
    """Time `fn` with perf_counter: `warmup` untimed calls (stopped early after
    `warmup_max_seconds`, at least 2), then up to `iterations` timed calls or `max_seconds`."""
    t_start = time.perf_counter()
    done = 0
    for done in range(1, warmup + 1):
        fn()
        if done >= 2 and time.perf_counter() - t_start > warmup_max_seconds:
            break
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    ms = np.asarray(times) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"batch_size": batch_size, "warmup_runs": done, "runs": int(len(ms)),
            "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "items_per_s": float(batch_size * len(ms) / (ms.sum() / 1000.0))}


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


def run_stage(script: Path, *args: str, timeout: float = 600) -> float:
    """Run `python script *args` in a fresh interpreter (fresh thread pools); return seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"stage {' '.join(args)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


# -- the sentence pool ----------------------------------------------------------------------
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_BAD = re.compile(r"(::|>>>|\*\*|==|\|\||__|\\|[{}\[\]<>=#@$%^~`|])")


def _prose_paragraphs(text: str):
    """Paragraphs of running prose: unindented lines, no headings, tables or code."""
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue  # code blocks, grammar rules, indented lists and tables
        if any(set(ln.strip()) <= set("*=-~^+|:. ") for ln in lines):
            continue  # rst headings and table rules
        if lines[0].lstrip().startswith(("..", ":", "*", "-", "|", "+", "#")):
            continue
        yield " ".join(ln.strip() for ln in lines)


def _good_sentence(s: str) -> bool:
    words = s.split()
    if not (8 <= len(words) <= 45) or not s.endswith("."):
        return False
    if _BAD.search(s) or s.count('"') % 2 or s.count("(") != s.count(")"):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) > 0.9 and s[0].isupper()


def sentence_pool(n_total: int = 350, seed: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """`n_total` distinct prose sentences from text shipped with installed packages:
    CPython's pydoc_data.topics (at most 8 per topic) and scikit-learn's
    datasets/descr/*.rst (at most 30 per file), shuffled with `seed`. Returns the sentences
    and, for each, its source."""
    import importlib.resources as resources

    from pydoc_data.topics import topics

    sources: list[tuple[str, str, int]] = [(f"pydoc_data.topics:{k}", topics[k], 8)
                                           for k in sorted(topics)]
    descr = resources.files("sklearn.datasets") / "descr"
    for p in sorted(descr.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".rst"):
            sources.append((f"sklearn/datasets/descr/{p.name}", p.read_text(), 30))
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    for where, text, cap in sources:
        taken = 0
        for para in _prose_paragraphs(text):
            for s in _SENT_SPLIT.split(para):
                s = " ".join(s.split())
                key = s.lower()
                if taken < cap and _good_sentence(s) and key not in seen:
                    seen.add(key)
                    pool.append((s, where))
                    taken += 1
    if len(pool) < n_total:
        raise SystemExit(f"only {len(pool)} sentences found; need {n_total}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n_total]
    picked = [pool[i] for i in order]
    return [s for s, _ in picked], [{"text": s, "source": w} for s, w in picked]


def print_kv(console, title: str, rows: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        t.add_row(str(k), str(v))
    console.print(t)
