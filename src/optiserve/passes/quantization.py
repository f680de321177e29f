"""INT8 quantization with ONNX Runtime (dynamic: weights ahead of time, activations at run time).

Per-tensor vs per-channel weight scales trade speed for accuracy, so `per_channel` is searched
when left unset: both candidates are measured and the gate and the benchmark choose.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field

from optiserve.convert.onnx_io import check
from optiserve.core.errors import ConfigError
from optiserve.passes.base import Artifact, Pass, PassContext, PassSkipped

_COMPUTE = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU"}


class Quantization(Pass):
    name = "quantization"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        method: Literal["dynamic"] = Field(
            "dynamic", description="dynamic: INT8 weights, activations quantized at run time.")
        precision: Literal["int8"] = Field("int8", description="Target precision.")
        per_channel: bool | None = Field(
            None, description="One scale per output channel (more accurate) instead of one per "
            "tensor. Unset: try both and keep the fastest that passes the gate.",
            json_schema_extra={"search": [False, True]})
        weight_type: Literal["qint8", "quint8"] = Field("qint8", description="Weight type.")
        reduce_range: bool = Field(
            False, description="7-bit weights: avoids saturation on CPUs without VNNI.")
        op_types: list[str] | None = Field(
            None, description="Operator types to quantize; default: all ONNX Runtime supports.")
        nodes_to_exclude: list[str] = Field(
            default_factory=list, description="Node names kept in FP32.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if config.per_channel is None:
            raise ConfigError("per_channel must be set when the pass runs (the search sets it).")
        model = onnx.load(str(artifact.path))
        ops = Counter(n.op_type for n in model.graph.node)
        if not (_COMPUTE & set(ops)):
            found = ", ".join(f"{k}" for k, _ in ops.most_common(4))
            raise PassSkipped(f"no operator INT8 can speed up (MatMul/Gemm/Conv/Attention); "
                              f"the graph has {found}")
        out = ctx.workdir / f"int8_{'pc' if config.per_channel else 'pt'}.onnx"
        with _quiet_root_logger():
            quantize_dynamic(
                str(artifact.path), str(out), per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=QuantType.QInt8 if config.weight_type == "qint8"
                else QuantType.QUInt8,
                op_types_to_quantize=config.op_types, nodes_to_exclude=config.nodes_to_exclude,
                # Fused graphs hold contrib ops shape inference cannot type: default to float.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        quantized = check(out)
        after = Counter(n.op_type for n in quantized.graph.node)
        int8_ops = {k: v for k, v in after.items()
                    if k.endswith("Integer") or k.startswith("Q") or k.startswith("Dynamic")}
        note = ("dynamic INT8 " + ("per-channel" if config.per_channel else "per-tensor") + ": "
                + ", ".join(f"{k} x{v}" for k, v in sorted(int8_ops.items())))
        return artifact.then(out, self.name, config, notes=[note])


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantizer logs advice on the root logger; keep the user's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
