"""Compile to OpenVINO IR, FP32 or INT8, to be run by the OpenVINO runtime.

OpenVINO is a peer of ONNX Runtime, not a step before it: on Intel and AMD CPUs its INT8
kernels can beat ONNX Runtime's several-fold on transformers (research/openvino-minilm.md). The
pass branches: it reads any standard FP32 ONNX model in the candidate tree (not ONNX Runtime's
fused or quantized graphs, which OpenVINO cannot read) and its IR candidates are leaves.

int8 "static" is NNCF post-training quantization calibrated on real inputs (the calibration
data, or the validation rows when none is given: the report says which). "weights" compresses
weights only (no calibration). The artifact is one file: a zip holding model.xml and model.bin.
"""

from __future__ import annotations

import logging
import zipfile
from collections import Counter
from typing import Literal

import onnx
from pydantic import Field

from optiserve.core.deps import require
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped

_QUANTIZED = ("Integer", "QLinear", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize")


class OpenVINO(Pass):
    name = "openvino"
    kind = "branch"

    class Config(PassConfig):
        int8: Literal["none", "weights", "static"] | None = Field(
            None, description="none: FP32 IR; weights: INT8 weights only; static: INT8 weights "
            "and activations calibrated with NNCF. Unset: try none and static.",
            json_schema_extra={"search": ["none", "static"]})
        calibration_rows: int = Field(100, ge=1, description="Rows used to calibrate (static).")
        model_type: Literal["auto", "transformer", "default"] = Field(
            "auto", description="NNCF model type; auto = transformer when the graph has "
            "LayerNormalization or attention facts were recorded.")

    def accepts(self, artifact: Artifact) -> str | None:
        """None if OpenVINO can read the artifact, else why not."""
        if artifact.format != "onnx":
            return f"it reads ONNX, not {artifact.format}"
        model = onnx.load(str(artifact.path), load_external_data=False)
        foreign = {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")}
        quantized = {n.op_type for n in model.graph.node if any(q in n.op_type for q in _QUANTIZED)}
        if foreign or quantized:
            return ("it reads standard FP32 ONNX; this graph has "
                    + ", ".join(sorted(foreign | quantized)[:4]))
        return None

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        ov = require("openvino", extra="openvino", feature="The openvino pass")
        why = self.accepts(artifact)
        if why:
            raise PassSkipped(why)
        core = ov.Core()
        model = core.read_model(str(artifact.path))
        note = "OpenVINO IR FP32"
        if config.int8 == "weights":
            nncf = _nncf()
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            note = "OpenVINO IR, INT8 weights (per-channel, asymmetric)"
        elif config.int8 == "static":
            model, note = self._static(model, artifact, config, ctx)
        out_dir = ctx.workdir / "ir"
        ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=False)
        out = ctx.workdir / "model.ovz"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            z.write(out_dir / "model.xml", "model.xml")
            z.write(out_dir / "model.bin", "model.bin")
        return artifact.then(out, self.name, config, format="openvino", notes=[note],
                             meta={"precision": "int8"} if config.int8 in ("weights", "static")
                             else None)

    def _static(self, model, artifact: Artifact, config: Config, ctx: PassContext):
        rows = ctx.calibration
        if rows is None or rows.n == 0:
            raise PassSkipped("OpenVINO static INT8 needs calibration rows: give "
                              "calibration_dataset (or validation_dataset), or use int8 'none' "
                              "or 'weights'")
        nncf = _nncf()
        n = min(config.calibration_rows, len(next(iter(rows.inputs.values()))))
        items = [{k: v[i:i + 1] for k, v in rows.inputs.items()} for i in range(n)]
        ops = Counter(n_.op_type for n_ in onnx.load(str(artifact.path),
                                                     load_external_data=False).graph.node)
        transformer = config.model_type == "transformer" or (
            config.model_type == "auto" and ("num_heads" in artifact.meta
                                              or "LayerNormalization" in ops))
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        model = nncf.quantize(model, nncf.Dataset(items), subset_size=n, **kwargs)
        return model, (f"OpenVINO IR INT8 (NNCF post-training, {'transformer' if transformer else 'default'} "
                       f"preset), calibrated on {n} rows of {rows.description}")


def _nncf():
    nncf = require("nncf", extra="openvino", feature="OpenVINO INT8")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    return nncf
