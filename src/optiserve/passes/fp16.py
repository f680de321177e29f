"""FP16: weights and activations in half precision, with ONNX Runtime's float16 converter.

FP16 is a GPU/accelerator optimization (tensor cores, half the memory traffic). On a CPU,
ONNX Runtime has FP16 kernels for few operators: it inserts Casts and folds the FP16 weights
back to FP32 when the session loads, so the model runs at FP32 speed from a file half the size.
The pass converts anyway (the artifact may be deployed to a GPU), says so in its note, and the
optimizer measures it like every other candidate.

The result must open and run in ONNX Runtime on the CPU. Operators whose FP16 form ONNX Runtime
rejects (e.g. Range: its schema has no float16) are kept in FP32: the converter's own unsafe
list by default, plus whatever ONNX Runtime refuses when the converted graph is loaded, found
by loading it and blocking the operator it names (the note lists them).

The pass branches: it converts every FP32 ONNX node of the tree (not INT8 graphs) and its
candidates are leaves, so FP16 is never stacked on a quantized model.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import Field

from optiserve.convert.onnx_io import check, write_meta
from optiserve.core.errors import first_line
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped

_QUANTIZED = ("Integer", "QLinear", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize")
# How ONNX Runtime names the operator it cannot run in FP16: a schema type error, or no kernel.
_REFUSED = (re.compile(r"of operator \((\w+)\)"), re.compile(r"implementation for (\w+)\("))
_MAX_RETRIES = 8


class FP16(Pass):
    name = "fp16"
    kind = "branch"

    class Config(PassConfig):
        keep_io_types: bool = Field(
            True, description="Keep FP32 inputs and outputs (Casts at the graph boundary), so "
            "callers send and receive the same types as before.")
        op_block_list: list[str] | None = Field(
            None, description="Operator types kept in FP32. Unset: the converter's unsafe list "
            "(ML operators, TopK, Range, CumSum, Min, Max, Upsample, ...). Operators ONNX "
            "Runtime cannot run in FP16 are added in any case.")
        node_block_list: list[str] = Field(
            default_factory=list, description="Node names kept in FP32.")
        min_positive_val: float = Field(
            5.96e-08, gt=0, lt=1, description="Non-zero weights smaller in magnitude are "
            "raised to this (the smallest FP16 subnormal) instead of becoming zero.")
        max_finite_val: float = Field(
            65504.0, gt=1, le=65504.0, description="Weights larger in magnitude are clamped to "
            "this (the largest finite FP16) instead of becoming infinite.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        model = onnx.load(str(artifact.path))
        why = _refuses(model)
        if why:
            raise PassSkipped(why)
        block = (list(config.op_block_list) if config.op_block_list is not None
                 else _default_block_list())
        converted, refused = _convert_loadable(model, config, block)
        halves = _weights(converted, TensorProto.FLOAT16)
        if not halves:
            raise PassSkipped("no FP32 weight to convert: every operator with weights is kept "
                              "in FP32 (op_block_list / node_block_list)")
        write_meta(converted, {"precision": "fp16"})
        out = ctx.workdir / "fp16.onnx"
        onnx.save(converted, str(out))
        check(out)
        note = _note(model, converted, config, block, refused, ctx)
        return artifact.then(out, self.name, config, notes=[note], meta={"precision": "fp16"})


def _default_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    # ONNX Runtime 1.31 on the CPU loads the other common operators in FP16 (MatMul, Gemm, Conv,
    # the norms, pooling, activations, LSTM/GRU, the com.microsoft fusions), inserting Casts
    # where it has no FP16 kernel: nothing to add here; _convert_loadable catches the rest.
    return list(DEFAULT_OP_BLOCK_LIST)


def _refuses(model: onnx.ModelProto) -> str | None:
    """Why FP16 does not apply to this graph, or None."""
    ops = {n.op_type for n in model.graph.node}
    quantized = sorted(op for op in ops if any(q in op for q in _QUANTIZED))
    if quantized:
        return f"the graph is already quantized ({', '.join(quantized[:3])}); FP16 applies to FP32"
    if _weights(model, TensorProto.FLOAT16):
        return "the graph already holds FP16 weights"
    if not _weights(model, TensorProto.FLOAT):
        return "the graph has no FP32 weight to convert"
    return None


def _weights(model: onnx.ModelProto, dtype: int) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors of one type, by name (exporters use both)."""
    found = {i.name: i for i in model.graph.initializer if i.data_type == dtype}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found.update({node.output[0]: a.t for a in node.attribute
                          if a.name == "value" and a.t.data_type == dtype})
    return found


def _convert_loadable(model: onnx.ModelProto, config: FP16.Config,
                      block: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Convert, then load in ONNX Runtime (CPU); block each operator it refuses and retry.
    Returns the model and the operators blocked that way."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    refused: list[str] = []
    for _ in range(_MAX_RETRIES):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        converted = convert_float_to_float16(
            copy, min_positive_val=config.min_positive_val,
            max_finite_val=config.max_finite_val, keep_io_types=config.keep_io_types,
            op_block_list=[*block, *refused], node_block_list=config.node_block_list or None)
        # The converter appends the input Casts last; the ONNX checker wants graph order.
        OnnxModel(converted).topological_sort()
        error = _load_error(converted)
        if error is None:
            return converted, refused
        op = next((m.group(1) for p in _REFUSED if (m := p.search(error))), None)
        if op is None or op in refused or op in block:
            break
        refused.append(op)
    raise PassSkipped(f"ONNX Runtime cannot run the FP16 graph ({first_line(error, 200)})"
                      + (f"; already kept in FP32: {', '.join(refused)}" if refused else ""))


def _load_error(model: onnx.ModelProto) -> str | None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure
        return str(exc)
    return None


def _note(before: onnx.ModelProto, after: onnx.ModelProto, config: FP16.Config,
          block: list[str], refused: list[str], ctx: PassContext) -> str:
    originals = _weights(before, TensorProto.FLOAT)
    halves = _weights(after, TensorProto.FLOAT16)
    clamped = sum(_clamped(originals[name], config) for name in halves if name in originals)
    ops = Counter(n.op_type for n in before.graph.node)
    kept = sorted(op for op in ops if op in block or op in refused)
    casts = sum(n.op_type == "Cast" for n in after.graph.node) - ops.get("Cast", 0)
    parts = [f"FP16: {len(halves)} weights, {_size(before)} -> {_size(after)}, "
             f"{casts} Casts added"]
    if kept:
        parts.append("kept in FP32: " + ", ".join(kept))
    if refused:
        parts.append("ONNX Runtime cannot run in FP16: " + ", ".join(refused))
    if clamped:
        parts.append(f"{clamped} weight values clamped to the FP16 range")
    if ctx.hardware.fp16_note:
        parts.append(ctx.hardware.fp16_note)
    return "; ".join(parts)


def _size(model: onnx.ModelProto) -> str:
    """Bytes of the FP32 and FP16 weights, for the note."""
    total = sum(t.ByteSize() for t in (*_weights(model, TensorProto.FLOAT).values(),
                                       *_weights(model, TensorProto.FLOAT16).values()))
    return f"{total / 1e3:.0f} kB" if total < 1e6 else f"{total / 1e6:.1f} MB"


def _clamped(original: onnx.TensorProto, config: FP16.Config) -> int:
    """Values outside FP16's range: too large, or non-zero and below the smallest kept."""
    values = np.abs(onnx.numpy_helper.to_array(original))
    return int(((values > config.max_finite_val)
                | ((values > 0) & (values < config.min_positive_val))).sum())
