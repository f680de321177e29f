"""Which INT8 format keeps the most accuracy on this CPU, and at what speed?

ONNX Runtime's x86 INT8 kernels differ by CPU: with VNNI (AVX-512 VNNI, AVX-VNNI) or AMX an
8-bit x 8-bit product is summed exactly; without them (AVX2 only, AVX-512 without VNNI) the
u8 x s8 instruction (VPMADDUBSW) adds pairs of products into 16 bits and saturates, so ONNX
Runtime advises 7-bit weights (reduce_range) there. S8S8 runs as U8S8 on those CPUs (the
activations are shifted by 128), so it saturates too. U8U8 uses a widening kernel without that
limit. This script makes one set of quantized files, with optiserve's quantization pass, in
every format, and measures each file's error against FP32 and its latency:

    .venv/bin/python benchmarks/int8_formats.py                 # on this CPU
    .venv/bin/python benchmarks/int8_formats.py --emulate Haswell   # + an AVX2-only CPU

`--emulate CPU` runs the same evaluation a second time under `qemu-x86_64 -cpu CPU` (Debian's
qemu-user): the kernels ONNX Runtime picks for that CPU compute bit for bit as there, so the
errors are that CPU's; the latencies under emulation mean nothing and are not printed.

Models: a random MLP (64-128-128-10) and a small CNN (the unit tests' models), the demo's
digits CNN trained for 6 epochs (accuracy on 450 held-out images), and all-MiniLM-L6-v2
(mean-pooled embeddings of 32 held-out sentences, 32 tokens; calibrated on 64 others).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STATIC = {  # name -> the quantization pass's options (static, per-channel, MinMax)
    "S8S8": {"activation_type": "qint8", "reduce_range": False},
    "S8S8 7-bit": {"activation_type": "qint8", "reduce_range": True},
    "U8S8": {"activation_type": "quint8", "reduce_range": False},
    "U8S8 7-bit": {"activation_type": "quint8", "reduce_range": True},
    "U8U8": {"activation_type": "quint8", "weight_type": "quint8", "reduce_range": False},
    "QOperator U8S8 7-bit": {"activation_type": "quint8", "reduce_range": True,
                             "quant_format": "qoperator"},
}
DYNAMIC = {
    "dynamic S8": {"weight_type": "qint8", "reduce_range": False},
    "dynamic S8 7-bit": {"weight_type": "qint8", "reduce_range": True},
    "dynamic U8": {"weight_type": "quint8", "reduce_range": False},
}


# -- phase 1: make the files (native CPU; the files do not depend on it) ---------------------
def _mlp_and_cnn(work: Path) -> dict[str, dict]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape, scale=None):
        scale = 1 / np.sqrt(shape[0]) if scale is None else scale
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32),
                                       name)

    def save(nodes, x_shape, y_shape, inits, name):
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=10)
        path = work / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate([(64, 128), (128, 128), (128, 10)]):
        inits += [init(f"W{i}", a, b), init(f"B{i}", b, scale=0.1)]
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}" if i < 2 else "y"])]
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            cur = f"r{i}"
    mlp = save(nodes, ["b", 64], ["b", 10], inits, "mlp")
    x = np.random.default_rng(1).standard_normal((384, 64)).astype(np.float32)

    inits = [init("C0", 8, 1, 3, 3, scale=0.4), init("C0b", 8, scale=0.1),
             init("C1", 8, 8, 3, 3, scale=0.15), init("C1b", 8, scale=0.1),
             init("G", 8, 10), init("Gb", 10, scale=0.1)]
    nodes = [helper.make_node("Conv", ["x", "C0", "C0b"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "C1", "C1b"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "Gb"], ["y"])]
    cnn = save(nodes, ["b", 1, 8, 8], ["b", 10], inits, "cnn")
    images = np.random.default_rng(2).random((384, 1, 8, 8)).astype(np.float32)
    return {"random MLP": {"path": mlp, "calib": {"x": x[:256]}, "eval": {"x": x[256:]}},
            "small CNN": {"path": cnn, "calib": {"x": images[:256]},
                          "eval": {"x": images[256:]}}}


def _torch_models(work: Path) -> dict[str, dict]:
    import torch

    from optiserve.convert.torch import import_torch_object
    from optiserve.demo import models
    from optiserve.demo.sentences import corpus

    out = {}
    x_tr, x_te, y_tr, y_te = models.digits()
    net = models.digits_cnn(x_tr, y_tr)
    out["digits CNN"] = {"path": _onnx(import_torch_object(
        net, _mkdir(work / "digits"), example_inputs=(torch.from_numpy(x_tr[:2]),)), work, {"input": x_tr[:2]}),
        "calib": {"input": x_tr[:256]}, "eval": {"input": x_te}, "labels": y_te}
    encoder, tokenizer = models.minilm()
    sentences = corpus(96)
    feed = models.tokenize(tokenizer, sentences, length=32)
    example = tuple(torch.from_numpy(v[:2]) for v in feed.values())
    out["all-MiniLM-L6-v2"] = {
        "path": _onnx(import_torch_object(encoder, _mkdir(work / "minilm"), example_inputs=example),
                      work, {k: v[:2] for k, v in feed.items()}),
        "calib": {k: v[:64] for k, v in feed.items()}, "eval": {k: v[64:] for k, v in feed.items()}}
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _onnx(imported, work: Path, sample: dict) -> Path:
    from optiserve.core.settings import load_settings
    from optiserve.passes import Artifact, PassContext, get_pass

    art = Artifact(path=imported.path, format=imported.format, signature=imported.signature,
                   meta=imported.meta)
    cls = get_pass("onnx_conversion")
    wd = Path(tempfile.mkdtemp(dir=work))
    ctx = PassContext(workdir=wd, settings=load_settings(), sample=sample)
    return cls().run(art, cls.parse_config({}), ctx).path


def make(work: Path, with_torch: bool) -> dict:
    from optiserve.core.settings import load_settings
    from optiserve.data.binding import Dataset
    from optiserve.passes import Artifact, PassContext, PassSkipped, get_pass
    from optiserve.convert.onnx_io import import_onnx

    specs = _mlp_and_cnn(work)
    if with_torch:
        specs.update(_torch_models(work))
    cls, plan = get_pass("quantization"), {}
    for model, spec in specs.items():
        imported = import_onnx(spec["path"])
        art = Artifact(path=spec["path"], format="onnx", signature=imported.signature,
                       meta=imported.meta)
        slug = model.replace(" ", "_").replace("-", "_")
        np.savez(work / f"{slug}_eval.npz", **spec["eval"])
        files = {"FP32": str(spec["path"])}
        variants = [(n, {"method": "static", "calibrate_method": "minmax", **o})
                    for n, o in STATIC.items()]
        variants += [(n, {"method": "dynamic", **o}) for n, o in DYNAMIC.items()]
        for name, options in variants:
            wd = work / slug / name.replace(" ", "_")
            wd.mkdir(parents=True, exist_ok=True)
            ctx = PassContext(workdir=wd, settings=load_settings(), sample={},
                              calibration=Dataset(spec["calib"], None, "calibration rows"))
            try:
                done = cls().run(art, cls.parse_config({"per_channel": True, **options}), ctx)
                files[name] = str(done.path)
            except PassSkipped as exc:
                files[name] = f"skipped: {exc}"
        plan[model] = {"files": files, "eval": str(work / f"{slug}_eval.npz"),
                       "labels": None if spec.get("labels") is None
                       else spec["labels"].tolist()}
    (work / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


# -- phase 2: evaluate (this CPU, or the emulated one) ---------------------------------------
def evaluate(work: Path, timed: bool) -> dict:
    plan = json.loads((work / "plan.json").read_text())
    from numpy._core._multiarray_umath import __cpu_features__ as cpu

    isa = [f for f in ("AVX2", "AVX512F", "AVX512VNNI", "AVX512_SPR") if cpu.get(f)]
    results = {"isa_seen_by_libraries": isa, "models": {}}
    for model, spec in plan.items():
        data = dict(np.load(spec["eval"]))
        ref = common.ort_session(spec["files"]["FP32"]).run(None, data)[0]
        rows = {}
        for name, path in spec["files"].items():
            if path.startswith("skipped"):
                rows[name] = {"skipped": path}
                continue
            session = common.ort_session(path)
            got = session.run(None, data)[0]
            row = _errors(got, ref, spec["labels"])
            if timed:
                batch = {k: v[:32] for k, v in data.items()}
                row["p50_ms_b32"] = common.time_calls(lambda: session.run(None, batch),
                                                      batch_size=32, iterations=100,
                                                      max_seconds=3)["p50_ms"]
            rows[name] = row
        results["models"][model] = rows
    return results


def _errors(got: np.ndarray, ref: np.ndarray, labels) -> dict:
    g, r = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1)
    cos = (g * r).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1) + 1e-30)
    row = {"rel_l2": float(np.linalg.norm(g - r) / np.linalg.norm(r)),
           "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    if labels is not None:
        row["accuracy"] = float((g.argmax(1) == np.asarray(labels)).mean())
    return row


# -- driver ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulate", metavar="CPU", help="also evaluate under qemu-x86_64 -cpu CPU")
    parser.add_argument("--no-torch", action="store_true", help="only the two random models")
    parser.add_argument("--phase", choices=["all", "eval"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "eval":  # the child under emulation
        args.out.write_text(json.dumps(evaluate(args.work, timed=False)))
        return
    work = Path(tempfile.mkdtemp(prefix="int8-formats-"))
    os.environ["OPTISERVE_HOME"] = str(work / "home")
    try:
        make(work, with_torch=not args.no_torch)
        runs = {"this CPU": evaluate(work, timed=True)}
        if args.emulate:
            runs[f"qemu -cpu {args.emulate}"] = _emulated(work, args.emulate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(runs)


def _emulated(work: Path, cpu: str) -> dict:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("--emulate needs qemu-x86_64: apt-get install qemu-user")
    out = work / "emulated.json"
    subprocess.run([qemu, "-cpu", cpu, sys.executable, __file__, "--phase", "eval",
                    "--work", str(work), "--out", str(out)], check=True,
                   stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _report(runs: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    info = {**common.machine_info(), **common.package_versions("onnxruntime")}
    common.print_kv(console, "machine", info)
    for where, res in runs.items():
        console.print(f"[bold]{where}[/]: ISA the libraries see: {' '.join(res['isa_seen_by_libraries'])}")
    for model in next(iter(runs.values()))["models"]:
        table = Table(title=model)
        table.add_column("format")
        for where, res in runs.items():
            has_acc = any("accuracy" in r for r in res["models"][model].values())
            table.add_column(f"{where}\nrel L2 err")
            table.add_column("mean / min cosine")
            if has_acc:
                table.add_column("accuracy")
            if where == "this CPU":
                table.add_column("p50 ms b32")
        for name in runs["this CPU"]["models"][model]:
            cells = [name]
            for where, res in runs.items():
                r = res["models"][model][name]
                has_acc = any("accuracy" in x for x in res["models"][model].values())
                if "skipped" in r:
                    cells += ["skipped", ""] + ([""] if has_acc else [])
                else:
                    cells += [f"{r['rel_l2']:.4f}", f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}"]
                    if has_acc:
                        cells.append(f"{r['accuracy']:.2%}")
                if where == "this CPU":
                    cells.append(f"{r.get('p50_ms_b32', float('nan')):.3f}")
            table.add_row(*cells)
        console.print(table)
    common.write_json(common.RESULTS_DIR / "int8_formats.json", {"machine": info, "runs": runs})
    console.print(f"wrote {common.RESULTS_DIR / 'int8_formats.json'}")


if __name__ == "__main__":
    main()
