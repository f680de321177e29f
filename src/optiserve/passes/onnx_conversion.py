"""Convert the original model to ONNX and check it with onnx.checker.

Parity with the original (max abs / relative error, label agreement) is measured by the
pipeline on the validation rows for every candidate, this one included.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optiserve.convert.onnx_io import check, signature_of, write_meta
from optiserve.core.errors import ConversionError
from optiserve.passes.base import Artifact, Pass, PassContext, PassSkipped


class OnnxConversion(Pass):
    name = "onnx_conversion"
    needs_onnx = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        opset: int | None = Field(None, ge=7, le=23,
                                  description="ONNX opset; default ONNX_OPSET_VERSION.")
        dtype: Literal["float32", "float64"] = Field(
            "float32", description="scikit-learn only: tensor type of the converted model. "
            "float64 matches scikit-learn's arithmetic where the ONNX operators allow it.")
        exporter: Literal["auto", "torchscript", "dynamo"] = Field(
            "auto", description="PyTorch only: torch.onnx exporter. auto tries the TorchScript "
            "exporter first (its graphs fuse best in ONNX Runtime), then dynamo.")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        if artifact.format == "onnx":
            raise PassSkipped("the model is already ONNX")
        opset = config.opset or ctx.settings.onnx_opset_version
        out = ctx.workdir / "converted.onnx"
        notes: list[str] = []
        if artifact.format in ("pkl", "skops"):
            from optiserve.convert.sklearn import load_estimator, to_onnx

            est = load_estimator(artifact.path, artifact.format)
            n = artifact.signature.inputs[0].shape[1]
            proto = to_onnx(est, n, dtype=config.dtype, opset=opset)
            write_meta(proto, {k: v for k, v in artifact.meta.items()
                               if k in ("num_heads", "hidden_size", "model_type")})
            out.write_bytes(proto.SerializeToString())
            notes.append(f"skl2onnx, {config.dtype} tensors, opset {opset}")
        elif artifact.format in ("torchscript", "pt2"):
            from optiserve.convert.torch import to_onnx

            used = to_onnx(artifact.path, artifact.format, artifact.signature, ctx.sample, out,
                           opset=opset, exporter=config.exporter)
            import onnx

            proto = onnx.load(str(out))
            write_meta(proto, {k: v for k, v in artifact.meta.items()
                               if k in ("num_heads", "hidden_size", "model_type")})
            onnx.save(proto, str(out))
            notes.append(f"torch.onnx.export ({used} exporter), opset {opset}")
        else:
            raise ConversionError(f"No ONNX converter for format '{artifact.format}'.")
        model = check(out)
        return artifact.then(out, self.name, config, signature=signature_of(model), notes=notes)
