"""TensorRT, through ONNX Runtime's TensorRT execution provider (NVIDIA GPUs only).

The artifact stays the ONNX model. The pass writes the provider and its options into the file's
metadata (`optiserve.execution_provider` = "tensorrt", `optiserve.trt_options` as JSON), so the
onnxruntime runtime opens it with TensorRT, then CUDA, then the CPU wherever it is loaded: the
optimizer's measurement, the benchmark worker, the server (runtimes/onnxruntime.py). The pass
builds the engine once through that same runtime, which caches it with TensorRT's timing cache
in `<model>.trt_cache/` next to the file; measuring the candidate reuses it.

Engines are not packed into the artifact: an engine holds kernels for one GPU model and one
TensorRT version, so a server builds its own on first load (the timing cache shortens it) and
caches it next to its copy of the model.

Precision: `fp16` lets TensorRT pick FP16 kernels where they are faster (inputs and outputs stay
FP32). INT8 is explicit quantization only: the model must already hold QuantizeLinear /
DequantizeLinear pairs (a QDQ model, e.g. the quantization pass's static method with
quant_format=qdq, calibrated there). TensorRT's implicit INT8 calibration is deprecated since
TensorRT 10 and is not driven from here, so this pass uses no calibration rows.

Shapes: one optimization profile. A dynamic first dimension (the batch) spans 1..max_batch_size
and TensorRT tunes for max_batch_size; other dynamic dimensions are fixed at the sample inputs'
sizes. Without a sample for each such input no profile is given, and ONNX Runtime builds for
the shapes it sees (rebuilding for new ones).

Without an NVIDIA GPU and the TensorRT execution provider the pass stops at once (PassSkipped,
saying what is missing and the fix), so an optimization run carries on with its other
candidates. The pass branches: every ONNX node of the tree gets a TensorRT leaf.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import onnx
from pydantic import Field

from optiserve.convert.onnx_io import write_meta
from optiserve.core.errors import first_line
from optiserve.core.hardware import Hardware
from optiserve.core.settings import Settings
from optiserve.core.types import Signature
from optiserve.passes.base import Artifact, Pass, PassConfig, PassContext, PassSkipped

PROVIDER = "TensorrtExecutionProvider"
_DYNAMIC_INT8 = ("Integer", "QLinear", "DynamicQuantize")
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


class TensorRT(Pass):
    name = "tensorrt"
    kind = "branch"

    class Config(PassConfig):
        fp16: bool = Field(True, description="Let TensorRT use FP16 kernels where faster "
                           "(mixed precision; inputs and outputs stay FP32).")
        int8: bool = Field(False, description="INT8 kernels for a QDQ model (explicit "
                           "quantization: QuantizeLinear/DequantizeLinear already in the "
                           "graph). No calibration is run here.")
        workspace_gb: float | None = Field(
            None, gt=0, description="Builder workspace memory in GB; unset: the "
            "TENSORRT_WORKSPACE_SIZE_GB setting.")
        builder_optimization_level: int = Field(
            3, ge=0, le=5, description="TensorRT builder optimization level: higher builds "
            "slower and may find faster kernels (3 is TensorRT's default).")
        max_batch_size: int = Field(
            32, ge=1, description="Largest batch of the optimization profile (a dynamic first "
            "dimension spans 1..this, tuned for this).")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        missing = preflight(ctx.hardware)
        if missing:
            raise PassSkipped(missing)
        model = onnx.load(str(artifact.path))
        why = _refuses(model, config)
        if why:
            raise PassSkipped(why)
        shapes = {name: tuple(value.shape) for name, value in ctx.sample.items()}
        options = trt_options(config, ctx.settings, artifact.signature, shapes,
                              max(config.max_batch_size, *ctx.batch_sizes, 1))
        write_meta(model, {"execution_provider": "tensorrt",
                           "trt_options": json.dumps(options, sort_keys=True)})
        out = ctx.workdir / "tensorrt.onnx"
        onnx.save(model, str(out))
        engines = _build(out, artifact, ctx)
        precision = ("FP16" if config.fp16 else "FP32") + (" + INT8 (QDQ)" if config.int8 else "")
        profile = (f"profile up to {options['trt_profile_max_shapes']}"
                   if "trt_profile_max_shapes" in options else "built for the shapes it sees")
        note = (f"TensorRT {precision}, workspace {options['trt_max_workspace_size'] / 2**30:g} "
                f"GB, {profile}; {len(engines)} engine(s) cached next to the model")
        facts = {"execution_provider": "tensorrt", "trt_options": options, "trt_engines": engines}
        if config.int8 or config.fp16:
            facts["precision"] = "int8" if config.int8 else "fp16"
        return artifact.then(out, self.name, config, notes=[note], meta=facts)


def preflight(hardware: Hardware) -> str | None:
    """What this machine lacks for TensorRT, as a one-line message with the fix; None if ready."""
    if not hardware.cuda:
        return (f"TensorRT needs an NVIDIA GPU with the TensorRT execution provider: this "
                f"machine has no GPU (CPU: {hardware.cpu}); install onnxruntime-gpu and "
                f"TensorRT on a GPU machine")
    if not hardware.has_provider(PROVIDER):
        have = ", ".join(hardware.ort_providers) or "none"
        return (f"TensorRT needs ONNX Runtime's {PROVIDER}: this machine has "
                f"{', '.join(hardware.gpus)} but ONNX Runtime offers only {have}; install "
                f"onnxruntime-gpu and TensorRT (pip install onnxruntime-gpu tensorrt) here")
    return None


def trt_options(config: TensorRT.Config, settings: Settings, signature: Signature,
                sample_shapes: Mapping[str, tuple[int, ...]],
                max_batch: int | None = None) -> dict[str, Any]:
    """The TensorRT execution provider's options, without the machine's cache paths (the
    runtime adds those where it loads the model). `max_batch`: the profile's largest batch,
    at least the batch sizes the run benchmarks (shapes outside a profile fail in TensorRT)."""
    gb = config.workspace_gb if config.workspace_gb is not None \
        else settings.tensorrt_workspace_size_gb
    return {"trt_fp16_enable": config.fp16, "trt_int8_enable": config.int8,
            "trt_max_workspace_size": int(gb * 2**30),
            "trt_builder_optimization_level": config.builder_optimization_level,
            "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
            **profile_shapes(signature, sample_shapes, max_batch or config.max_batch_size)}


def profile_shapes(signature: Signature, sample_shapes: Mapping[str, tuple[int, ...]],
                   max_batch: int) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for every input with a dynamic dimension, or {} when
    a dynamic dimension other than the batch has no sample size to fix it at."""
    low, high = [], []
    for spec in signature.inputs:
        if -1 not in spec.shape:
            continue
        sample = sample_shapes.get(spec.name)
        if sample is not None and len(sample) != len(spec.shape):
            sample = None
        ranges = [(dim, dim) if dim != -1 else (1, max_batch) if axis == 0
                  else (sample[axis], sample[axis]) if sample is not None else None
                  for axis, dim in enumerate(spec.shape)]
        if None in ranges:
            return {}
        low.append(f"{spec.name}:{'x'.join(str(lo) for lo, _ in ranges)}")
        high.append(f"{spec.name}:{'x'.join(str(hi) for _, hi in ranges)}")
    if not low:
        return {}
    return {"trt_profile_min_shapes": ",".join(low), "trt_profile_opt_shapes": ",".join(high),
            "trt_profile_max_shapes": ",".join(high)}


def _refuses(model: onnx.ModelProto, config: TensorRT.Config) -> str | None:
    ops = {n.op_type for n in model.graph.node}
    dynamic = sorted(op for op in ops if any(q in op for q in _DYNAMIC_INT8))
    if dynamic:
        return (f"TensorRT does not run ONNX Runtime's dynamic INT8 operators "
                f"({', '.join(dynamic[:3])}); it takes FP32/FP16 graphs and QDQ INT8 graphs")
    if config.int8 and not _QDQ & ops:
        return ("int8 needs a QDQ model (QuantizeLinear/DequantizeLinear pairs: explicit "
                "quantization) and this graph has none; set int8=false or quantize it to QDQ")
    if _QDQ & ops and not config.int8:
        return "the graph is QDQ-quantized: set int8=true to build it with TensorRT"
    return None


def _build(path, artifact: Artifact, ctx: PassContext) -> list[str]:
    """Open the model the way serving will (which builds and caches the engine), run the
    sample through it; the engine files cached."""
    from optiserve.runtimes.onnxruntime import OnnxRuntime, engine_cache_dir

    runtime = OnnxRuntime(path, artifact.signature, threads=ctx.settings.threads, format="onnx")
    try:
        with runtime:
            if ctx.sample:
                runtime.predict(ctx.sample)
    except Exception as exc:  # our ModelLoadError, or ORT's own types from the first run
        raise PassSkipped(f"TensorRT could not build an engine for this model: "
                          f"{first_line(exc)}") from None
    return sorted(p.name for p in engine_cache_dir(path).glob("*.engine"))
