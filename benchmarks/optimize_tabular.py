"""scikit-learn RandomForest pipeline: sklearn `predict` vs optiserve's ONNX artifact in ORT.

    python benchmarks/optimize_tabular.py [--max-seconds 10] [--keep]

Model: Pipeline(StandardScaler, RandomForestClassifier(n_estimators=200, random_state=0)) on
load_breast_cancer, stratified 70/30 split with seed 0. It is saved with joblib and registered
from that file; optiserve optimizes it with ["onnx_conversion", "quantization"], validated on a
CSV of the test split with its label column. Then, in this process (no torch is loaded):
  sklearn  pipeline.predict(float64 rows)
  optiserve artifact in ONNX Runtime (CPU EP, 2 intra-op threads): session.run(["label"]) on the
           same rows, the float64 -> float32 cast included in the timed call
at batch 1 (one test row) and batch 1000 (1000 test rows drawn with replacement, seed 0).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH_SIZES = (1, 1000)
TARGET_SPEEDUP_B1 = 5.0


def make_chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCH_SIZES), figsize=(9, 3.8))
    for ax, bs in zip(axes, BATCH_SIZES):
        keys = list(rows)
        p50 = [rows[k]["latency"][f"batch_{bs}"]["p50_ms"] for k in keys]
        p99 = [rows[k]["latency"][f"batch_{bs}"]["p99_ms"] for k in keys]
        x = np.arange(len(keys))
        bars = ax.bar(x, p50, color=["#7f7f7f", "#2ca02c"][:len(keys)])
        ax.errorbar(x, p50, yerr=[np.zeros(len(keys)), np.subtract(p99, p50)], fmt="none",
                    ecolor="black", capsize=4, lw=1)
        for b, v, top in zip(bars, p50, p99):
            ax.text(b.get_x() + b.get_width() / 2, top * 1.15, f"p50 {v:.3g} ms", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(x, [rows[k]["name"] for k in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(min(p50) / 5, max(p99) * 4)
        ax.set_title(f"batch {bs}")
        ax.set_ylabel("ms per call (bar p50, whisker p99)")
    fig.suptitle("RandomForest(200) pipeline on breast_cancer, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="cap on timed seconds per path and batch size (default 10)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    a = p.parse_args(argv)

    import joblib
    import onnxruntime as ort
    import sklearn
    from rich.console import Console
    from rich.table import Table
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    console = Console(width=150)
    t_all = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="optiserve-bench-tabular-"))
    console.print(f"[bold]work folder[/] {workdir}")
    try:
        # -- data and model -------------------------------------------------------------
        data = load_breast_cancer()
        X, y = data.data, data.target
        X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y,
                                                  random_state=0)
        model = Pipeline([("scale", StandardScaler()),
                          ("rf", RandomForestClassifier(n_estimators=200, random_state=0))])
        t0 = time.perf_counter()
        model.fit(X_tr, y_tr)
        fit_s = time.perf_counter() - t0
        pkl = workdir / "rf_pipeline.joblib"
        joblib.dump(model, pkl)

        csv_path = workdir / "test_split.csv"
        names = [str(n) for n in data.feature_names]
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*names, "label"])
            for row, label in zip(X_te, y_te):
                w.writerow([repr(float(v)) for v in row] + [int(label)])

        # -- optiserve --------------------------------------------------------------------
        quiet_opt = common.wait_for_quiet(limit_s=10)
        reg = common.temp_registry(workdir)
        import optiserve
        from optiserve.core.errors import GateFailedError

        t0 = time.perf_counter()
        source = optiserve.register("breast_cancer_rf", pkl, registry=reg)
        status, error = "completed", None
        try:
            result = optiserve.optimize(
                "breast_cancer_rf", registry=reg, optimizations=["onnx_conversion",
                                                                 "quantization"],
                validation_dataset={"source": "file", "path": str(csv_path),
                                    "label_column": "label"},
                accuracy_threshold=0.99, batch_sizes=list(BATCH_SIZES), iterations=200,
                warmup=20)
        except GateFailedError as exc:
            result, status, error = exc.report, "rejected", str(exc)
        opt_s = time.perf_counter() - t0
        chosen = result.version
        onnx_path = reg.path(chosen)
        details = result.details()

        # -- side by side -----------------------------------------------------------------
        sess = common.ort_session(onnx_path)
        in_name = sess.get_inputs()[0].name
        in_type = sess.get_inputs()[0].type
        np_type = np.float64 if in_type == "tensor(double)" else np.float32

        def ort_labels(x):
            return sess.run(["label"], {in_name: x.astype(np_type)})[0]

        def ort_proba(x):
            return sess.run(["probabilities"], {in_name: x.astype(np_type)})[0]

        big = X_te[np.random.default_rng(0).choice(len(X_te), 1000, replace=True)]
        inputs = {1: np.ascontiguousarray(X_te[:1]), 1000: np.ascontiguousarray(big)}

        quiet = common.wait_for_quiet(limit_s=10)
        busy0 = common._cpu_times()
        rows: dict = {
            "sklearn": {"name": "sklearn predict", "size_mb": common.file_mb(pkl),
                        "file": "joblib pickle", "latency": {}},
            "ort": {"name": "optiserve ONNX in ORT", "size_mb": common.onnx_total_mb(onnx_path),
                    "file": onnx_path.name, "latency": {}},
        }
        import os
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t_timed = time.perf_counter()
        for bs in BATCH_SIZES:
            x = inputs[bs]
            rows["sklearn"]["latency"][f"batch_{bs}"] = common.time_calls(
                lambda: model.predict(x), batch_size=bs, max_seconds=a.max_seconds)
            rows["ort"]["latency"][f"batch_{bs}"] = common.time_calls(
                lambda: ort_labels(x), batch_size=bs, max_seconds=a.max_seconds)
        wall = time.perf_counter() - t_timed
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        busy1 = common._cpu_times()
        hz = os.sysconf("SC_CLK_TCK")
        total = (busy1[0] - busy0[0]) / hz
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        other_busy = max(0.0, (total - (busy1[1] - busy0[1]) / hz - own) / total) \
            if total else 0.0

        # -- quality --------------------------------------------------------------------
        sk_test, ort_test = model.predict(X_te), ort_labels(X_te)
        sk_big, ort_big = model.predict(big), ort_labels(big)
        proba_diff = float(np.abs(model.predict_proba(X_te) - ort_proba(X_te)).max())
        rows["sklearn"]["accuracy"] = float((sk_test == y_te).mean())
        rows["ort"]["accuracy"] = float((ort_test == y_te).mean())
        agreement = {
            "test_split": {"n": len(X_te), "agreement": float((sk_test == ort_test).mean()),
                           "n_disagree": int((sk_test != ort_test).sum())},
            "batch_1000": {"n": len(big), "agreement": float((sk_big == ort_big).mean()),
                           "n_disagree": int((sk_big != ort_big).sum())},
            "max_abs_proba_diff_test": proba_diff,
        }
        import onnx

        ops: dict[str, int] = {}
        for node in onnx.load(str(onnx_path)).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- report ---------------------------------------------------------------------------
    sk_lat, o_lat = rows["sklearn"]["latency"], rows["ort"]["latency"]
    speedup = {b: sk_lat[b]["p50_ms"] / o_lat[b]["p50_ms"] for b in sk_lat}
    t = Table(title=f"RandomForest(200) pipeline, breast_cancer test split n={len(X_te)} "
              f"(ms per call; ORT {common.THREADS} threads)")
    t.add_column("path")
    t.add_column("size MB", justify="right")
    t.add_column("test acc", justify="right")
    for bs in BATCH_SIZES:
        t.add_column(f"b{bs} p50 / p99 ms", justify="right")
        t.add_column(f"b{bs} rows/s", justify="right")
        t.add_column(f"b{bs} runs", justify="right")
    for key, row in rows.items():
        cells = []
        for bs in BATCH_SIZES:
            lat = row["latency"][f"batch_{bs}"]
            cells += [f"{lat['p50_ms']:.4f} / {lat['p99_ms']:.4f}",
                      f"{lat['items_per_s']:,.0f}", str(lat["runs"])]
        t.add_row(row["name"], f"{row['size_mb']:.3f}", f"{row['accuracy']:.4f}", *cells)
    t.add_row("speed-up (sklearn p50 / ORT p50)", "", "",
              *sum(([f"{speedup[f'batch_{b}']:.1f}x", "", ""] for b in BATCH_SIZES), []))
    console.print(t)
    console.print(
        f"label agreement: test split {agreement['test_split']['agreement']:.4f} "
        f"({agreement['test_split']['n_disagree']} of {agreement['test_split']['n']} differ), "
        f"1000-row batch {agreement['batch_1000']['agreement']:.4f} "
        f"({agreement['batch_1000']['n_disagree']} differ); max |proba diff| on the test split "
        f"{proba_diff:.2e}")
    console.print(f"ONNX ops: {ops}; input {in_name} {in_type}")

    ot = Table(title=f"optiserve's own candidates (its measurements; * = chosen; "
               f"status {status})")
    for col in ("candidate", "runtime", "size MB", "accuracy", "gate", "b1 p50 ms",
                "b1000 p50 ms"):
        ot.add_column(col)
    det = details["details"]
    for i, c in enumerate([det["original"], *det["candidates"]]):
        ot.add_row(("* " if i - 1 == det["chosen"] else "") + c["label"], c["runtime"],
                   f"{c['size_mb']:.3f}", f"{c['value']:.4f}",
                   "-" if c["gate"] is None else ("pass" if c["gate"]["passed"] else "fail"),
                   f"{c['latency']['batch_1']['p50_ms']:.4f}",
                   f"{c['latency']['batch_1000']['p50_ms']:.3f}")
    console.print(ot)
    for note in det["notes"]:
        console.print(f"  optiserve note: {note}")
    console.print(f"other processes' share of the CPU while timing: {other_busy:.0%}"
                  + (" [yellow]WARNING: contended machine, latencies inflated[/]"
                     if other_busy > 0.10 else ""))

    checks = [
        ("ORT batch 1 p50 >= 5x faster than sklearn predict",
         speedup["batch_1"] >= TARGET_SPEEDUP_B1,
         f"{sk_lat['batch_1']['p50_ms']:.4f} ms / {o_lat['batch_1']['p50_ms']:.4f} ms = "
         f"{speedup['batch_1']:.0f}x"),
        ("identical labels (test split and 1000-row batch)",
         agreement["test_split"]["n_disagree"] == 0 and agreement["batch_1000"]["n_disagree"] == 0,
         f"{agreement['test_split']['n_disagree']} + {agreement['batch_1000']['n_disagree']} "
         "differing labels"),
    ]
    for name, ok, detail in checks:
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {name}: "
                      f"{detail}")

    total_s = time.perf_counter() - t_all
    payload = {
        "benchmark": "optimize_tabular",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine_info(),
        "versions": {**common.package_versions("scikit-learn", "skl2onnx", "onnxruntime",
                                               "onnx", "numpy", "optiserve"),
                     "sklearn_imported": sklearn.__version__, "ort_imported": ort.__version__},
        "method": {
            "data": f"load_breast_cancer, stratified 70/30 split, seed 0: {len(X_tr)} train, "
                    f"{len(X_te)} test, {X.shape[1]} features",
            "model": "Pipeline(StandardScaler, RandomForestClassifier(n_estimators=200, "
                     "random_state=0)), saved with joblib, registered from the file",
            "timing": "perf_counter per call; 20 warm-up calls (stopped after 3 s), then up to "
                      f"200 calls or {a.max_seconds} s; sklearn: predict on float64 rows; ORT: "
                      "session.run(['label']) incl. the cast to the model's input type",
            "batch_1000": "1000 test rows drawn with replacement (numpy default_rng(0))",
            "sizes": "joblib pickle vs the .onnx file",
        },
        "fit_seconds": round(fit_s, 2),
        "paths": rows,
        "speedup_p50": speedup,
        "agreement": agreement,
        "onnx": {"ops": ops, "input": in_name, "input_type": in_type},
        "optiserve": {"status": status, "error": error, "seconds": round(opt_s, 1),
                      "source_version": {"ref": source.ref, "format": source.format,
                                         "size_mb": source.size_mb, "meta": source.meta},
                      "chosen_version": {"ref": chosen.ref, "format": chosen.format,
                                         "size_mb": chosen.size_mb, "passes": chosen.passes},
                      "response": result.response, "details": details,
                      "machine_before": quiet_opt},
        "contention": {"before_timing": quiet, "other_cpu_busy_while_timing": round(other_busy, 3),
                       "timed_wall_s": round(wall, 1)},
        "targets": [{"target": n, "passed": ok, "detail": d} for n, ok, d in checks],
        "total_seconds": round(total_s, 1),
    }
    common.write_json(a.results / "optimize_tabular.json", payload)
    make_chart(rows, a.results / "optimize_tabular.png")
    console.print(f"wrote {a.results / 'optimize_tabular.json'} and optimize_tabular.png "
                  f"(total {total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
