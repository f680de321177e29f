"""The stages optimize_precision.py runs in fresh processes: optiserve's optimize, and one
variant of one model (quality on the held-out rows, then latency per batch size).

A variant stage imports only what its runtime needs: the ONNX Runtime and OpenVINO variants
never load torch, so torch's OpenMP threads cannot disturb their timings.
"""

from __future__ import annotations

import json
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

import common
from precision_models import MODELS, build_module, heldout, load_npz

VARIANTS = {
    "torch_fp32": "PyTorch eager FP32",
    "ort_fp32": "ONNX Runtime FP32 (torch.onnx.export defaults)",
    "ort_dynamic": "ORT quantize_dynamic, defaults",
    "ort_static": "ORT quantize_static, defaults (QDQ, MinMax, 100 calibration rows)",
    "torch_dynamic": "PyTorch quantize_dynamic({nn.Linear}, qint8)",
    "openvino_fp32": "OpenVINO FP32 (convert_model of the ONNX, f32 hint)",
    "optiserve_auto": "optiserve optimize([\"auto\"]), its chosen artifact",
}
ORT_FILES = {"ort_fp32": "fp32.onnx", "ort_dynamic": "dynamic.onnx", "ort_static": "static.onnx"}
_DYNAMIC_OPS = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM"}
_STATIC_OPS = {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd"}
OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": common.THREADS,
             "INFERENCE_PRECISION_HINT": "f32"}  # as optiserve's OpenVINO runtime


# -- what precision an artifact computes in ---------------------------------------------------
def precision_of(path: Path, fmt: str) -> dict:
    """'fp32', 'fp16', 'int8 dynamic', 'int8 static' or 'int8 weights', read off the graph."""
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        ops = Counter(n.op_type for n in model.graph.node)
        fp16 = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
        kind = ("int8 dynamic" if _DYNAMIC_OPS & set(ops) else
                "int8 static" if _STATIC_OPS & set(ops) else
                "fp16" if fp16 > len(model.graph.initializer) / 2 else "fp32")
        int8 = {k: v for k, v in ops.items() if k in _DYNAMIC_OPS | _STATIC_OPS
                or k == "DequantizeLinear"}
        return {"precision": kind, "int8_ops": dict(sorted(int8.items()))}
    if fmt == "openvino":
        xml = _ov_xml(path).decode(errors="replace")
        fq = xml.count('type="FakeQuantize"')
        kind = ("int8 static" if fq else
                "int8 weights" if 'element_type="i8"' in xml or 'element_type="u8"' in xml
                else "fp16" if 'element_type="f16"' in xml else "fp32")
        return {"precision": kind, "int8_ops": {"FakeQuantize": fq} if fq else {}}
    return {"precision": "unknown", "int8_ops": {}}


def _ov_xml(path: Path) -> bytes:
    if path.suffix == ".xml":
        return path.read_bytes()
    with zipfile.ZipFile(path) as z:  # optiserve's .ovz: model.xml + model.bin
        return z.read("model.xml")


# -- the runtimes, one harness per kind -----------------------------------------------------------
def _ort(path: Path):
    """common.ort_session (CPU EP, 2 intra-op threads, ORT_ENABLE_ALL): the same session for
    every ONNX variant, optiserve's included."""
    import onnxruntime as ort

    sess = common.ort_session(path)
    types = {i.name: {"tensor(float)": np.float32, "tensor(int64)": np.int64,
                      "tensor(int32)": np.int32}.get(i.type) for i in sess.get_inputs()}

    def make_call(feed):
        f = _bind(feed, types)

        def call():
            return sess.run(None, f)[0]
        return call
    runtime = (f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op="
               f"{common.THREADS}, inter_op=1, ORT_ENABLE_ALL")
    return make_call, runtime


def _openvino(path: Path):
    """OpenVINO CPU, compiled as optiserve's OpenVINO runtime does (latency hint, 2 threads,
    f32 inference precision, so AVX512-BF16 CPUs do not silently run bf16)."""
    import openvino as ov

    core = ov.Core()
    if path.suffix == ".xml":
        model = core.read_model(str(path))
    else:
        with zipfile.ZipFile(path) as z:
            xml, weights = z.read("model.xml"), z.read("model.bin")
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
    compiled = core.compile_model(model, "CPU", OV_CONFIG)
    request = compiled.create_infer_request()
    types = {p.get_any_name(): p.get_element_type().to_dtype() for p in compiled.inputs}

    def make_call(feed):
        f = _bind(feed, types)

        def call():
            request.infer(f)
            return request.get_output_tensor(0).data.copy()
        return call
    return make_call, f"openvino {ov.__version__}, CPU, {OV_CONFIG}"


def _torch(model: str, cache: Path, dynamic: bool):
    import torch

    torch.set_num_threads(common.THREADS)
    module = build_module(model, cache)
    if dynamic:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear},
                                                            dtype=torch.qint8)
    names = MODELS[model].inputs

    def make_call(feed):
        args = [torch.from_numpy(feed[n]) for n in names]

        def call():
            with torch.inference_mode():
                return module(*args).numpy()
        return call
    return module, make_call, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _bind(feed: dict[str, np.ndarray], types: dict[str, type | None]) -> dict[str, np.ndarray]:
    """The runtime's inputs by its own names (one input takes the one array, whatever its
    name), cast to its dtypes outside the timed call."""
    if len(types) == 1 and len(feed) == 1:
        feed = {next(iter(types)): next(iter(feed.values()))}
    return {n: np.ascontiguousarray(feed[n], dtype=t or feed[n].dtype) for n, t in types.items()}


def _load(model: str, variant: str, cache: Path, workdir: Path, out: dict):
    """(make_call, runtime description); fills size, file and precision into `out`."""
    if variant in ("torch_fp32", "torch_dynamic"):
        import torch

        module, make_call, runtime = _torch(model, cache, variant == "torch_dynamic")
        sd = workdir / f"{model}-{variant}.pt"
        torch.save(module.state_dict(), sd)
        out.update(file="torch.save(state_dict)", size_mb=common.file_mb(sd),
                   precision="int8 dynamic" if variant == "torch_dynamic" else "fp32")
        return make_call, runtime
    if variant in ORT_FILES:
        path = cache / ORT_FILES[variant]
        out.update(file=path.name, size_mb=common.onnx_total_mb(path), **precision_of(path, "onnx"))
        return _ort(path)
    if variant == "openvino_fp32":
        path = cache / "openvino.xml"
        out.update(file="openvino.xml + .bin", size_mb=common.file_mb(path, path.with_suffix(
            ".bin")), **precision_of(path, "openvino"))
        return _openvino(path)
    chosen = json.loads((workdir / f"{model}-optimize.json").read_text())["chosen_version"]
    path, fmt = Path(chosen["path"]), chosen["format"]
    out.update(file=chosen["label"], artifact=path.name, size_mb=common.file_mb(path),
               **precision_of(path, fmt))
    if fmt == "onnx":
        return _ort(path)
    if fmt == "openvino":
        return _openvino(path)
    from optiserve.core.types import Signature  # any other format: optiserve's own runtime
    from optiserve.runtimes.base import load_runtime

    rt = load_runtime(path, Signature.model_validate(chosen["signature"]), format=fmt,
                      threads=common.THREADS)
    rt.load()

    def make_call(feed):
        def call():
            return next(iter(rt.predict(feed).values()))
        return call
    return make_call, f"{rt.name} via optiserve.runtimes, {common.THREADS} threads"


def quality(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Top-1 accuracy on the labels (CNNs) and agreement / cosine vs torch FP32's outputs."""
    cos = cosine(outputs, reference)
    q = {"n": int(len(outputs)), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    if labels is not None:
        pred = outputs.argmax(1)
        q["accuracy"] = float((pred == labels).mean())
        q["agreement_with_fp32"] = float((pred == reference.argmax(1)).mean())
    return q


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-30)


def stage_variant(model: str, variant: str, cache: Path, workdir: Path, max_seconds: float,
                  warmup_s: float) -> None:
    spec = MODELS[model]
    inputs, labels = heldout(cache)
    out: dict = {"variant": variant, "name": VARIANTS[variant]}
    t0 = time.perf_counter()
    make_call, out["runtime"] = _load(model, variant, cache, workdir, out)
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    n, step = len(inputs[spec.inputs[0]]), max(spec.batch_sizes)
    parts = [np.asarray(make_call({k: v[i:i + step] for k, v in inputs.items()})(), np.float32)
             for i in range(0, n, step)]
    out["quality"] = quality(np.concatenate(parts), np.load(cache / "reference.npy"), labels)
    out["latency"] = {}
    for bs in spec.batch_sizes:
        idx = np.arange(bs) % n
        feed = {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}
        out["latency"][f"batch_{bs}"] = common.time_calls(
            make_call(feed), batch_size=bs, warmup=20, iterations=1000, max_seconds=max_seconds,
            warmup_max_seconds=warmup_s)
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common.write_json(workdir / f"{model}-{variant}.json", out)


# -- optiserve --------------------------------------------------------------------------------
def stage_optimize(model: str, cache: Path, workdir: Path, iterations: int, warmup: int,
                   passes: list[str]) -> None:
    """register the torch module in a throwaway OPTISERVE_HOME, then optimize(passes), by
    default ["auto"]. A failure is written down (status "error") rather than raised: the peers
    still run."""
    import torch

    torch.set_num_threads(common.THREADS)
    spec = MODELS[model]
    reg = common.temp_registry(workdir)
    import optiserve
    from optiserve.core.errors import GateFailedError
    from optiserve.optimizer.request import OptimizeRequest

    labelled = spec.metric == "accuracy"
    fields: dict = {
        "optimizations": passes,
        "validation_dataset": {"source": "file", "path": str(cache / "heldout.npz"),
                               "label_column": "label" if labelled else None},
        "calibration_dataset": {"source": "file", "path": str(cache / "calibration.npz")},
        "accuracy_threshold": spec.threshold, "batch_sizes": list(spec.batch_sizes),
        "iterations": iterations, "warmup": warmup}
    if labelled and "training_dataset" in OptimizeRequest.model_fields:  # for QAT
        fields["training_dataset"] = {"source": "file", "path": str(cache / "training.npz"),
                                      "label_column": "label"}
    out: dict = {"request": fields, "status": "error", "error": None, "chosen_version": None}
    t0 = time.perf_counter()
    try:
        example = load_npz(cache / "calibration.npz")
        module = build_module(model, cache)
        optiserve.register(model, module, registry=reg, label_column="label" if labelled
                           else None, example_inputs=tuple(example[n][:2] for n in spec.inputs))
        out["register_seconds"] = round(time.perf_counter() - t0, 1)
        try:
            result, out["status"] = optiserve.optimize(model, registry=reg, **fields), "completed"
        except GateFailedError as exc:  # the closest candidate is kept as rejected
            result, out["status"], out["error"] = exc.report, "rejected", str(exc)
        chosen = result.version
        out["details"] = result.details()
        out["chosen_label"] = result.chosen.artifact.label
        out["chosen_version"] = None if chosen is None else {
            "ref": chosen.ref, "format": chosen.format, "size_mb": chosen.size_mb,
            "passes": chosen.passes, "path": str(reg.path(chosen)),
            "label": result.chosen.artifact.label,
            "signature": chosen.signature.model_dump(mode="json")}
    except Exception as exc:  # noqa: BLE001 - "auto" may not be built yet: say what failed
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["settings"] = {"iterations": iterations, "warmup": warmup, "threads": reg.settings.threads}
    common.write_json(workdir / f"{model}-optimize.json", out)
