"""ONNX Runtime graph optimization, saved offline; transformer fusion where it applies.

For transformer encoders (BERT-like), ONNX Runtime's transformer optimizer fuses attention,
embedding + LayerNorm, GELU and skip-LayerNorm into single kernels. It needs the number of
heads and the hidden size: read from the model's optiserve metadata (recorded when a Hugging
Face module was registered) or given in the config. Other graphs get ONNX Runtime's offline
"basic" level by default: constant folding and the fusions that stay standard ONNX (MatMul+Add
into Gemm, Conv+BatchNorm), so the INT8 quantizer and OpenVINO can still read the result. The
"extended" level writes ONNX Runtime's own operators (FusedConv, FusedGemm), which the
quantizer leaves in FP32 and OpenVINO cannot read, and ONNX Runtime applies it at load time
anyway.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import onnx
import onnxruntime as ort
from pydantic import Field

from optiserve.convert.onnx_io import check, read_meta, write_meta
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped

_TRANSFORMER_HINTS = {"LayerNormalization", "Softmax"}


class GraphOptimization(Pass):
    name = "graph_optimization"

    class Config(PassConfig):
        level: Literal["basic", "extended"] = Field(
            "basic", description="ONNX Runtime offline optimization level: basic stays standard "
            "ONNX (quantizable, readable by OpenVINO); extended adds ONNX Runtime's fused "
            "operators, which it also applies at load time.")
        transformer: Literal["auto", "on", "off"] = Field(
            "auto", description="Fuse transformer blocks (attention, LayerNorm, GELU): auto "
            "does it when the graph has LayerNormalization and Softmax.")
        model_type: str = Field("bert", description="Transformer family for the fusion.")
        num_heads: int = Field(0, ge=0, description="Attention heads; 0 = from metadata.")
        hidden_size: int = Field(0, ge=0, description="Hidden size; 0 = from metadata.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        model = onnx.load(str(artifact.path))
        ops = Counter(n.op_type for n in model.graph.node)
        use_transformer = config.transformer == "on" or (
            config.transformer == "auto" and _TRANSFORMER_HINTS <= set(ops))
        if use_transformer:
            return self._transformer(artifact, config, ctx, model)
        out = ctx.workdir / "graph_optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                                       if config.level == "extended"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        ort.InferenceSession(str(artifact.path), so, providers=["CPUExecutionProvider"])
        optimized = check(out)
        after = Counter(n.op_type for n in optimized.graph.node)
        if sum(after.values()) >= sum(ops.values()) and after == ops:
            raise PassSkipped("ONNX Runtime found nothing to optimize offline")
        note = f"ORT {config.level}: {sum(ops.values())} -> {sum(after.values())} nodes"
        return artifact.then(out, self.name, config, notes=[note])

    def _transformer(self, artifact, config, ctx, model) -> Artifact:
        from onnxruntime.transformers.optimizer import optimize_model

        meta = read_meta(model)
        heads = config.num_heads or int(meta.get("num_heads", 0))
        hidden = config.hidden_size or int(meta.get("hidden_size", 0))
        optimized = optimize_model(str(artifact.path), model_type=config.model_type,
                                   num_heads=heads, hidden_size=hidden)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        out = ctx.workdir / "graph_optimized.onnx"
        proto = optimized.model
        write_meta(proto, {"fused": ",".join(f"{k}={v}" for k, v in fused.items())})
        onnx.save(proto, str(out))
        check(out)
        note = "transformer fusion: " + (", ".join(f"{k} x{v}" for k, v in fused.items())
                                         or "nothing fused")
        if not (heads and hidden) and "Attention" not in fused:
            note += " (attention not fused: set num_heads and hidden_size)"
        return artifact.then(out, self.name, config, notes=[note],
                             meta={"fused_attention": fused.get("Attention", 0)})
