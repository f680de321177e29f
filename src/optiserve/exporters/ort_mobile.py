"""ONNX Runtime's mobile format: an .ort flatbuffer plus the reduced operator config.

The .ort file holds the graph already optimized (ONNX Runtime does not optimize it again at
load), so a phone or a minimal build loads it fast; the config lists the operators (and, with
`type_reduction`, the types) it uses, which a minimal ONNX Runtime build is compiled with
(`build.sh --minimal_build --include_ops_by_config model.required_operators.config`).
This is what onnxruntime.tools.convert_onnx_models_to_ort does, kept to one model and one style.
"""

from __future__ import annotations

import platform
from typing import Literal

import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from optiserve.core.errors import first_line
from optiserve.core.quiet import route_logs
from optiserve.exporters.base import Exported, Exporter, ExportError, Source, Tolerance

_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_QUANTIZED = ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinear",
              "ConvInteger")
_X86 = ("x86_64", "amd64", "i386", "i686")


def host_platform() -> Literal["arm", "amd64"]:
    """The target this machine is: amd64 on x86, else arm (ARM itself, or any other CPU, for
    which the ARM file is the portable one: it uses no x86-only layout)."""
    return "amd64" if platform.machine().lower() in _X86 else "arm"


class OrtMobileExporter(Exporter):
    format = "ort"
    reads = ("onnx",)
    framework = "onnx"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        optimization_level: Literal["basic", "extended", "all"] = Field(
            "all", description="Graph optimizations saved into the file.")
        target_platform: Literal["arm", "amd64"] = Field(
            default_factory=host_platform,
            description="The CPU the file will run on; default: this machine's (amd64 on x86, "
            "arm on ARM). arm (phones, edge boards): no x86-only NCHWc layout, QDQ kept as "
            "int8; amd64: x86 layout optimizations allowed (the file then runs on x86 only). "
            "Export for a device of the other kind with -O target_platform=arm (or amd64).")
        type_reduction: bool = Field(
            False, description="Also record the types each operator uses, for a smaller "
            "minimal build.")

    def export(self, source: Source, config: Config) -> Exported:
        create_config_from_models = _ort_tools()
        out = source.workdir / "model.ort"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(out)
        so.graph_optimization_level = _LEVELS[config.optimization_level]
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed",
                                    "1" if config.target_platform == "arm" else "0")
        so.log_severity_level = 3
        # the NCHWc transformer writes x86-only kernels; an ARM device could not run the file
        disabled = (["NchwcTransformer"] if config.target_platform == "arm"
                    and config.optimization_level == "all" else None)
        try:
            ort.InferenceSession(str(source.path), so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=disabled)
        except Exception as exc:  # ORT's own exception types
            raise ExportError(f"ONNX Runtime cannot convert the model to its mobile format: "
                              f"{first_line(exc)}",
                              hint="Try optimization_level 'basic', or the openvino export.") \
                from None
        suffix = "required_operators_and_types" if config.type_reduction else "required_operators"
        ops_config = source.workdir / f"model.{suffix}.config"
        create_config_from_models([out], ops_config, config.type_reduction)
        ops = _count_ops(ops_config.read_text())
        host = host_platform()
        target = (f"{config.target_platform} (this machine)" if config.target_platform == host
                  else f"{config.target_platform}, not this {host} machine: the timings here "
                  "do not predict the device's")
        notes = [f"ONNX Runtime {ort.__version__} ORT format, {config.optimization_level} "
                 f"optimizations for {target}; reduced operator config: "
                 f"{ops} operators (build a minimal ONNX Runtime with --minimal_build "
                 f"--include_ops_by_config {ops_config.name})"]
        return Exported(path=out, signature=source.signature, notes=notes,
                        tolerance=_tolerance(source), meta={"ort_operators": ops},
                        files={"model.ort": out, ops_config.name: ops_config})


def _ort_tools():
    """onnxruntime.tools' create_config_from_models, imported without its side effect: the
    import calls logging.basicConfig(), which would print every library's INFO lines with
    ours; that handler is taken off the root logger again (its own INFO line goes to our
    debug log, see core/quiet.py)."""
    import logging

    route_logs()
    root = logging.getLogger()
    before = list(root.handlers)
    from onnxruntime.tools.ort_format_model import create_config_from_models

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return create_config_from_models


def _tolerance(source: Source) -> Tolerance:
    """Float graphs match to rounding (fusions reorder sums); a quantized graph may run other
    int8 kernels once saved for ARM, so it is held to its outputs' direction instead."""
    graph = onnx.load(str(source.path), load_external_data=False).graph
    if any(any(q in n.op_type for q in _QUANTIZED) for n in graph.node):
        return Tolerance(min_cosine=0.999, min_label_agreement=0.99)
    return Tolerance(atol=1e-4, rtol=1e-3)


def _count_ops(text: str) -> int:
    """Operators listed in a reduced build config ('domain;opset;Op1,Op2' per line)."""
    total = 0
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            parts = line.split(";")
            total += len([op for op in parts[-1].split(",") if op.strip()]) if len(parts) >= 3 \
                else 0
    return total
