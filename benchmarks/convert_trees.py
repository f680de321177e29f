"""Gradient-boosted trees: native predict vs ONNX Runtime (onnxmltools, optiserve's artifact).

    python benchmarks/convert_trees.py [--models xgb_breast_cancer,...]
        [--variants native,native_inplace,onnxmltools_ort,optiserve] [--max-seconds 3]

Models (300 boosting rounds, seed 0, n_jobs=2; stratified 70/30 split, seed 0):
  xgb_breast_cancer  xgb_wine  lgbm_breast_cancer  lgbm_wine
(XGBClassifier / LGBMClassifier on load_breast_cancer (binary) and load_wine (3 classes)).

Variants (each timed in its own fresh process, 2 threads, one at a time):
  native           the wrapper's predict_proba on float64 rows
  native_inplace   XGBoost only: Booster.inplace_predict (the low-latency path XGBoost documents)
  onnxmltools_ort  onnxmltools.convert_xgboost / convert_lightgbm(zipmap=False), run in ORT
  optiserve        register(name, model object) in a throwaway OPTISERVE_HOME, then
                   optimize(["onnx_conversion"]); the chosen artifact run by load_runtime
Batch 1 is one test row; batch 1000 is 1000 test rows drawn with replacement (seed 0). Labels
and probabilities are compared with the native wrapper's on the test split + the 1000 rows.

A run of some models or variants merges into the existing results JSON (rows of earlier runs
are marked; --no-merge starts afresh), so `--variants optiserve` can be re-run alone.
Output: a table, PASS/FAIL lines, benchmarks/results/convert_trees.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
MODELS = {"xgb_breast_cancer": ("xgboost", "breast_cancer"), "xgb_wine": ("xgboost", "wine"),
          "lgbm_breast_cancer": ("lightgbm", "breast_cancer"),
          "lgbm_wine": ("lightgbm", "wine")}
VARIANTS = ("native", "native_inplace", "onnxmltools_ort", "optiserve")
ORT_VARIANTS = ("onnxmltools_ort", "optiserve")
BATCH_SIZES = (1, 1000)
N_TREES = 300
TARGET_SPEEDUP_B1 = 3.0


# -- preparation (in this process; nothing here is timed) --------------------------------
def prepare(model: str, workdir: Path) -> dict:
    """Fit the model, save it (joblib), its data (NPZ), the reference predictions and the
    onnxmltools ONNX file."""
    import joblib
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.model_selection import train_test_split

    framework, dataset = MODELS[model]
    X, y = (load_breast_cancer if dataset == "breast_cancer" else load_wine)(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    big = X_te[np.random.default_rng(0).choice(len(X_te), 1000, replace=True)]
    if framework == "xgboost":
        from xgboost import XGBClassifier

        est = XGBClassifier(n_estimators=N_TREES, random_state=0, n_jobs=common.THREADS)
    else:
        from lightgbm import LGBMClassifier

        est = LGBMClassifier(n_estimators=N_TREES, random_state=0, n_jobs=common.THREADS,
                             verbose=-1)
    t0 = time.perf_counter()
    est.fit(X_tr, y_tr)
    fit_s = time.perf_counter() - t0
    joblib.dump(est, workdir / f"{model}.joblib")
    np.savez(workdir / f"{model}-data.npz", test=X_te, big=big, y_test=y_te)
    np.savez(workdir / f"{model}-valid.npz", X=X_te, label=y_te)  # optiserve's validation data
    rows = np.concatenate([X_te, big])
    np.savez(workdir / f"{model}-reference.npz", label=est.predict(rows),
             proba=est.predict_proba(rows))
    types = [("input", FloatTensorType([None, X.shape[1]]))]
    onx = (onnxmltools.convert_xgboost(est, initial_types=types) if framework == "xgboost"
           else onnxmltools.convert_lightgbm(est, initial_types=types, zipmap=False))
    (workdir / f"{model}-onnxmltools.onnx").write_bytes(onx.SerializeToString())
    return {"framework": framework, "dataset": dataset, "features": int(X.shape[1]),
            "classes": int(len(np.unique(y))), "train_rows": len(X_tr), "test_rows": len(X_te),
            "trees": N_TREES * (1 if len(np.unique(y)) == 2 else len(np.unique(y))),
            "fit_seconds": round(fit_s, 2),
            "test_accuracy_native": float((est.predict(X_te) == y_te).mean()),
            "joblib_mb": common.file_mb(workdir / f"{model}.joblib"),
            "onnxmltools_mb": common.file_mb(workdir / f"{model}-onnxmltools.onnx")}


# -- stages (each in a fresh process) ----------------------------------------------------
def stage_optimize(model: str, workdir: Path, iterations: int, warmup: int) -> None:
    """register the model object + optimize(["onnx_conversion"]); a failure is recorded."""
    import joblib

    out: dict = {"error": None}
    try:
        reg = common.temp_registry(workdir)
        import optiserve
        from optiserve.core.errors import GateFailedError

        est = joblib.load(workdir / f"{model}.joblib")
        t0 = time.perf_counter()
        try:
            src = optiserve.register(model, est, registry=reg)
        except Exception as exc:  # the feature under test may not exist yet: record it
            out["error"] = f"register: {type(exc).__name__}: {exc}"
            return
        out["source_version"] = {"ref": src.ref, "format": src.format, "framework":
                                 src.framework, "size_mb": src.size_mb, "meta": src.meta}
        status = "completed"
        try:
            result = optiserve.optimize(
                model, registry=reg, optimizations=["onnx_conversion"],
                validation_dataset={"source": "file", "path": str(workdir / f"{model}-valid.npz"),
                                    "label_column": "label"},
                batch_sizes=list(BATCH_SIZES), iterations=iterations, warmup=warmup)
        except GateFailedError as exc:
            result, status, out["error"] = exc.report, "rejected", str(exc)
        except Exception as exc:
            out["error"] = f"optimize: {type(exc).__name__}: {exc}"
            return
        v = result.version
        out.update(status=status, seconds=round(time.perf_counter() - t0, 1),
                   details=result.details(),
                   chosen_version={"ref": v.ref, "format": v.format, "passes": v.passes,
                                   "size_mb": v.size_mb, "path": str(reg.path(v)),
                                   "signature": v.signature.model_dump(mode="json")})
    finally:
        common.write_json(workdir / f"{model}-optimize.json", out)


def _predictor(model: str, variant: str, workdir: Path):
    """(timed call, full call returning (labels, probabilities)) for one variant."""
    if variant in ("native", "native_inplace"):
        import joblib

        est = joblib.load(workdir / f"{model}.joblib")
        if variant == "native":
            return est.predict_proba, lambda x: (est.predict(x), est.predict_proba(x))
        booster = est.get_booster()
        booster.set_param({"nthread": common.THREADS})

        def proba(x):
            p = booster.inplace_predict(x)
            return np.stack([1 - p, p], axis=1) if p.ndim == 1 else p
        return booster.inplace_predict, lambda x: (proba(x).argmax(1), proba(x))
    if variant == "onnxmltools_ort":
        sess = common.ort_session(workdir / f"{model}-onnxmltools.onnx")

        def run(x):
            return sess.run(None, {"input": x.astype(np.float32)})
        return run, lambda x: tuple(run(x)[:2])
    from optiserve.core.types import Signature
    from optiserve.runtimes.base import load_runtime

    chosen = json.loads((workdir / f"{model}-optimize.json").read_text())["chosen_version"]
    sig = Signature.model_validate(chosen["signature"])
    rt = load_runtime(Path(chosen["path"]), sig, format=chosen["format"],
                      threads=common.THREADS)
    rt.load()
    name = sig.inputs[0].name

    def both(x):
        out = rt.predict({name: x})
        proba = next(v for v in out.values() if v.ndim == 2 and v.dtype.kind == "f")
        return out.get("label", proba.argmax(1)), proba
    return lambda x: rt.predict({name: x}), both


def stage_variant(model: str, variant: str, workdir: Path, max_seconds: float,
                  warmup_seconds: float) -> None:
    data = np.load(workdir / f"{model}-data.npz")
    t0 = time.perf_counter()
    fn, both = _predictor(model, variant, workdir)
    load_s = time.perf_counter() - t0
    inputs = {1: np.ascontiguousarray(data["test"][:1]), 1000: np.ascontiguousarray(data["big"])}
    latency = {f"batch_{bs}": common.time_calls(
        lambda x=x: fn(x), batch_size=bs, iterations=1000, max_seconds=max_seconds,
        warmup_max_seconds=warmup_seconds) for bs, x in inputs.items()}
    label, proba = both(np.concatenate([data["test"], data["big"]]))
    np.savez(workdir / f"{model}-{variant}-pred.npz", label=np.asarray(label).reshape(-1),
             proba=proba)
    common.write_json(workdir / f"{model}-{variant}.json",
                      {"latency": latency, "load_seconds": round(load_s, 3)})


# -- orchestration ---------------------------------------------------------------------
def _stage(args: list[str], log: Path, timeout: float = 600) -> dict:
    return common.stage(SCRIPT, args, log, timeout)


def _quality(workdir: Path, model: str, variant: str) -> dict:
    ref = np.load(workdir / f"{model}-reference.npz")
    got = np.load(workdir / f"{model}-{variant}-pred.npz")
    same = ref["label"] == got["label"].astype(ref["label"].dtype)
    return {"rows": int(same.size), "label_agreement": float(same.mean()),
            "n_disagree": int((~same).sum()),
            "max_abs_proba_diff": float(np.abs(ref["proba"] - got["proba"]).max())}


def run_model(model: str, variants: list[str], a, workdir: Path, console) -> dict:
    log = workdir / "stages.log"
    entry: dict = {"prepare": prepare(model, workdir), "stages": {}, "variants": {},
                   "errors": {}}
    if MODELS[model][0] != "xgboost" and "native_inplace" in variants:
        variants = [v for v in variants if v != "native_inplace"]
    if "optiserve" in variants:
        console.print(f"{model}: optiserve register + optimize(['onnx_conversion']) ...")
        entry["stages"]["optimize"] = _stage(
            ["--stage", "optimize", "--model", model, "--workdir", str(workdir),
             "--opt-iterations", str(a.opt_iterations), "--opt-warmup", str(a.opt_warmup)], log)
        path = workdir / f"{model}-optimize.json"
        opt = json.loads(path.read_text()) if path.exists() else {
            "error": entry["stages"]["optimize"].get("error")}
        entry["optiserve"] = opt
        if not opt.get("chosen_version"):
            entry["errors"]["optiserve"] = opt.get("error") or "optimize gave no artifact"
            console.print(f"[yellow]  optiserve failed: {entry['errors']['optiserve']}[/]")
    for v in variants:
        if v in entry["errors"]:
            continue
        quiet = common.wait_for_quiet(limit_s=a.wait_quiet)
        console.print(f"{model}: {v} (machine {quiet['other_cpu_busy'] or 0:.0%} busy) ...")
        st = _stage(["--stage", "variant", "--model", model, "--variant", v, "--workdir",
                     str(workdir), "--max-seconds", str(a.max_seconds), "--warmup-seconds",
                     str(a.warmup_seconds)], log)
        entry["stages"][v] = {**st, "before": quiet}
        if "error" in st:
            entry["errors"][v] = st["error"]
            continue
        row = json.loads((workdir / f"{model}-{v}.json").read_text())
        entry["variants"][v] = {**row, "quality": _quality(workdir, model, v),
                                "other_cpu_busy": st.get("other_cpu_busy"),
                                "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return entry




# -- report ----------------------------------------------------------------------------
def _speedup(entry: dict, v: str, bs: int) -> float | None:
    rows = entry["variants"]
    if v not in rows or "native" not in rows:
        return None
    key = f"batch_{bs}"
    return rows["native"]["latency"][key]["p50_ms"] / rows[v]["latency"][key]["p50_ms"]


def report(models: dict, console) -> list[dict]:
    from rich.table import Table

    t = Table(title=f"Trees ({N_TREES} rounds): ms per call, {common.THREADS} threads; "
              "speed-up = native p50 / p50; agreement vs native predict (test + 1000 rows)")
    for col in ("model", "variant", "b1 p50 / p95", "b1 x", "b1000 p50 / p95", "b1000 x",
                "labels", "max |dp|"):
        t.add_column(col, justify="left" if col in ("model", "variant") else "right")
    checks = []
    for model, entry in models.items():
        for v in VARIANTS:
            if v in entry.get("errors", {}):
                t.add_row(model, v, "[red]error (below)[/]", *[""] * 5)
            if v not in entry.get("variants", {}):
                continue
            row = entry["variants"][v]
            cells = []
            for bs in BATCH_SIZES:
                lat, sp = row["latency"][f"batch_{bs}"], _speedup(entry, v, bs)
                cells += [f"{lat['p50_ms']:.4f} / {lat['p95_ms']:.4f}",
                          "-" if sp is None else f"{sp:.1f}x"]
            q = row["quality"]
            t.add_row(model, v + (" (earlier run)" if row.get("earlier_run") else ""), *cells,
                      f"{q['label_agreement']:.2%}", f"{q['max_abs_proba_diff']:.1e}")
        for v in ORT_VARIANTS:
            sp = _speedup(entry, v, 1)
            if sp is None:
                checks.append({"model": model, "variant": v, "passed": None, "detail":
                               entry.get("errors", {}).get(v, "not measured")})
                continue
            q = entry["variants"][v]["quality"]
            ok = sp >= TARGET_SPEEDUP_B1 and q["n_disagree"] == 0
            checks.append({"model": model, "variant": v, "passed": ok, "speedup_b1": sp,
                           "n_disagree": q["n_disagree"],
                           "detail": f"{sp:.1f}x at batch 1, {q['n_disagree']} of {q['rows']} "
                                     "labels differ"})
    console.print(t)
    for c in checks:
        tag = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[c["passed"]]
        console.print(f"{tag} {c['model']} {c['variant']}: ORT >= {TARGET_SPEEDUP_B1:.0f}x "
                      f"native at batch 1, identical labels: {c['detail']}")
    for model, entry in models.items():
        for v, row in entry.get("variants", {}).items():
            busy = row.get("other_cpu_busy") or 0
            if busy > 0.10:
                console.print(f"[yellow]WARNING[/] {model} {v}: other processes used "
                              f"{busy:.0%} of the CPU while timing; latencies inflated")
    return checks


def make_chart(models: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(BATCH_SIZES))
    colors = {"native": "#7f7f7f", "native_inplace": "#bcbd22", "onnxmltools_ort": "#1f77b4",
              "optiserve": "#2ca02c"}
    names = list(models)
    width = 0.8 / len(VARIANTS)
    for ax, bs in zip(axes, BATCH_SIZES):
        for i, v in enumerate(VARIANTS):
            xs, ys = [], []
            for j, m in enumerate(names):
                row = models[m].get("variants", {}).get(v)
                if row:
                    xs.append(j + (i - (len(VARIANTS) - 1) / 2) * width)
                    ys.append(row["latency"][f"batch_{bs}"]["p50_ms"])
            ax.bar(xs, ys, width, label=v, color=colors[v])
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("p50 ms per call (log)")
        ax.set_title(f"batch {bs}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"XGBoost / LightGBM ({N_TREES} rounds), CPU, {common.THREADS} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="timed seconds per variant and batch size, at most (default 3)")
    p.add_argument("--warmup-seconds", type=float, default=1.0,
                   help="cap on the 20 warm-up calls (default 1)")
    p.add_argument("--opt-iterations", type=int, default=100, help="optiserve's own timing")
    p.add_argument("--opt-warmup", type=int, default=10, help="optiserve's own warm-up")
    p.add_argument("--wait-quiet", type=float, default=5.0,
                   help="seconds to wait for a quiet machine before each timed stage")
    p.add_argument("--no-merge", action="store_true",
                   help="do not keep rows of earlier runs from the results JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    # internal: one stage in a fresh process
    p.add_argument("--stage", choices=("optimize", "variant"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.stage == "optimize":
        stage_optimize(a.model, a.workdir, a.opt_iterations, a.opt_warmup)
        return 0
    if a.stage == "variant":
        stage_variant(a.model, a.variant, a.workdir, a.max_seconds, a.warmup_seconds)
        return 0
    from rich.console import Console

    models = common.pick_names(a.models, MODELS, "model")
    variants = common.pick_names(a.variants, VARIANTS, "variant")
    console = Console(width=160)
    t_all = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="optiserve-bench-trees-"))
    console.print(f"[bold]work folder[/] {workdir}")
    try:
        fresh = {m: run_model(m, variants, a, workdir, console) for m in models}
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out_json = a.results / "convert_trees.json"
    previous = None if a.no_merge or not out_json.exists() else json.loads(out_json.read_text())
    data = common.merge_results(previous, fresh)
    checks = report(data, console)
    total_s = time.perf_counter() - t_all
    common.write_json(out_json, {
        "benchmark": "convert_trees", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine_info(),
        "versions": common.package_versions("xgboost", "lightgbm", "onnxmltools", "onnxruntime",
                                            "onnx", "scikit-learn", "numpy", "optiserve"),
        "method": {
            "models": f"XGBClassifier / LGBMClassifier(n_estimators={N_TREES}, random_state=0, "
                      f"n_jobs={common.THREADS}), stratified 70/30 split, seed 0",
            "timing": "each variant in a fresh process; 20 warm-up calls (cut at "
                      f"{a.warmup_seconds} s), then up to 1000 calls or {a.max_seconds} s; "
                      "ORT variants include the float64 -> float32 cast",
            "batch_1000": "1000 test rows drawn with replacement (numpy default_rng(0))",
            "quality": "labels and probabilities vs the native wrapper's predict / "
                       "predict_proba on the test split + the 1000 rows",
        },
        "this_run": {"models": models, "variants": variants, "seconds": round(total_s, 1)},
        "models": data, "targets": checks})
    make_chart(data, a.results / "convert_trees.png")
    console.print(f"wrote {out_json} and convert_trees.png (total {total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
