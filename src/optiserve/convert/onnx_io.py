"""ONNX files: validation with onnx.checker and signature extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optiserve.convert.formats import Imported
from optiserve.core.errors import ModelLoadError, first_line
from optiserve.core.types import Signature, TensorSpec

META_PREFIX = "optiserve."


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type
    if t.HasField("tensor_type"):
        elem = t.tensor_type.elem_type
        dtype = "str" if elem == onnx.TensorProto.STRING else np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(elem)).name
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                     for d in t.tensor_type.shape.dim)
        return TensorSpec(name=value.name, dtype=dtype, shape=dims)
    return TensorSpec(name=value.name, dtype="object", shape=())


def signature_of(model: onnx.ModelProto) -> Signature:
    inits = {i.name for i in model.graph.initializer}
    return Signature(
        inputs=tuple(_spec(i) for i in model.graph.input if i.name not in inits),
        outputs=tuple(_spec(o) for o in model.graph.output),
    )


def read_meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props
            if p.key.startswith(META_PREFIX)}


def write_meta(model: onnx.ModelProto, meta: dict[str, object]) -> None:
    """Carry facts (e.g. num_heads for attention fusion) inside the file, across passes."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        full = META_PREFIX + key
        if full in existing:
            existing[full].value = str(value)
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=full, value=str(value)))


def check(path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for bad files
        raise ModelLoadError(str(path), f"it is not a valid ONNX model ({first_line(exc, 200)})",
                             hint="Re-export the model; `onnx.checker.check_model` must "
                             "accept it.") from None


def check_runs(path: Path) -> None:
    """ONNX Runtime must open the file (IR version, opsets and operators it supports)."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure
        raise ModelLoadError(str(path), f"ONNX Runtime {ort.__version__} cannot open it "
                             f"({first_line(exc, 200)})", hint="Re-export with an opset and IR "
                             "version this ONNX Runtime supports (see ONNX_OPSET_VERSION).") \
            from None


def import_onnx(path: Path) -> Imported:
    model = check(path)
    check_runs(path)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return Imported(path=path, format="onnx", signature=signature_of(model),
                    meta={"opsets": opsets, **read_meta(model)})


def import_onnx_proto(model: onnx.ModelProto, workdir: Path) -> Imported:
    path = workdir / "model.onnx"
    onnx.save(model, str(path))
    return import_onnx(path)

