"""OpenVINO IR: model.xml (the graph) and model.bin (the weights), for OpenVINO deployments.

Made by the `openvino` pass, so an exported IR and an optimizer candidate are the same thing;
the registry stores both files in one zip (format "openvino") and `--output` writes them apart.
"""

from __future__ import annotations

import zipfile
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optiserve.core.errors import first_line
from optiserve.data.binding import Dataset
from optiserve.exporters.base import Exported, Exporter, ExportError, Source, Tolerance
from optiserve.passes.base import Artifact, PassContext, PassSkipped


class OpenVINOExporter(Exporter):
    format = "openvino"
    reads = ("onnx",)
    framework = "openvino"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        int8: Literal["none", "weights", "static"] = Field(
            "none", description="none: FP32 IR; weights: INT8 weights (NNCF compression); "
            "static: INT8 weights and activations calibrated on the calibration rows.")
        calibration_rows: int = Field(100, ge=1, description="Rows used to calibrate (static).")

    def export(self, source: Source, config: Config) -> Exported:
        from optiserve.passes.openvino import OpenVINO

        artifact = Artifact(path=source.path, format=source.format, signature=source.signature,
                            meta=source.meta)
        why = OpenVINO().accepts(artifact)
        if why:
            raise ExportError(f"OpenVINO cannot take this model: {why}.",
                              hint="Export to 'ort' (ONNX Runtime runs every ONNX and ONNX-ML "
                              "operator), or export the FP32 version this one was made from.")
        ctx = PassContext(workdir=source.workdir, settings=source.settings,
                          sample={k: v[:8] for k, v in source.rows.items()},
                          calibration=Dataset(inputs=source.calibration, labels=None,
                                              description=source.calibration_described))
        pass_ = OpenVINO()
        try:
            done = pass_.run(artifact, pass_.parse_config(config.model_dump()), ctx)
        except PassSkipped as exc:
            raise ExportError(f"OpenVINO export: {exc}.") from None
        except Exception as exc:  # OpenVINO's converter raises its own types per op
            raise ExportError(f"OpenVINO cannot convert the model: {first_line(exc)}",
                              hint="Export to 'ort' instead.") from None
        folder = source.workdir / "ir"
        with zipfile.ZipFile(done.path) as z:
            z.extractall(folder)
        tolerance = {"none": Tolerance(atol=1e-4, rtol=1e-3),
                     "weights": Tolerance(min_cosine=0.99),
                     "static": Tolerance(min_cosine=0.95)}[config.int8]
        return Exported(path=done.path, signature=source.signature, tolerance=tolerance,
                        notes=done.notes, files={"model.xml": folder / "model.xml",
                                                 "model.bin": folder / "model.bin"})
