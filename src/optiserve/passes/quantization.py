"""INT8 quantization with ONNX Runtime, dynamic or static.

dynamic: weights are quantized ahead of time, activations at run time (no data needed).
static: activations too, their ranges calibrated ahead of time on real rows (the calibration
data, else the validation data): no range computed per request, so usually faster, and as
accurate as the calibration (MinMax, Percentile or Entropy; calibration.py streams the rows in
chunks so memory stays bounded).

The method and per-tensor vs per-channel weight scales trade speed for accuracy, so both are
searched when left unset; the calibration method is an accuracy knob, tried MinMax first and the
next one only when the previous missed the accuracy gate. Unset activation type and reduce_range
follow the hardware preflight (core/hardware.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from optiserve.convert.onnx_io import check
from optiserve.core.errors import ConfigError, first_line
from optiserve.core.hardware import Hardware
from optiserve.passes.base import Artifact, ExcludesNodes, Pass, PassContext, PassSkipped

_QUANTIZABLE = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU"}
# Compute-heavy ops worth reporting when they stay FP32 (ONNX Runtime's fused ones included).
_COMPUTE = _QUANTIZABLE | {"ConvTranspose", "MultiHeadAttention", "FusedMatMul", "FusedConv",
                           "FusedGemm"}
_CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_SHORT = {"qint8": "S8", "quint8": "U8"}


class Quantization(Pass):
    name = "quantization"

    class Config(ExcludesNodes):
        method: Literal["dynamic", "static"] | None = Field(
            None, description="dynamic: INT8 weights, activations quantized at run time. static: "
            "activations too, with ranges calibrated on the calibration data. Unset: try both.",
            json_schema_extra={"search": ["dynamic", "static"]})
        precision: Literal["int8"] = Field("int8", description="Target precision.")
        per_channel: bool | None = Field(
            None, description="One scale per output channel (more accurate) instead of one per "
            "tensor. Unset: try both and keep the fastest that passes the gate.",
            json_schema_extra={"search": [False, True]})
        calibrate_method: Literal["minmax", "percentile", "entropy"] | None = Field(
            None, description="Static only: how activation ranges are read from the calibration "
            "rows: minmax (full range), percentile (clips outliers), entropy (least KL "
            "divergence). Unset: minmax, then the next only if the previous missed the gate.",
            json_schema_extra={"search": ["minmax", "percentile", "entropy"],
                               "when": {"method": "static"}, "retry": True})
        percentile: float = Field(
            99.999, gt=0, le=100, description="Percentile calibration: the share of values, "
            "in percent, the range covers.")
        quant_format: Literal["qdq", "qoperator"] = Field(
            "qdq", description="Static only: qdq (QuantizeLinear/DequantizeLinear pairs that ONNX "
            "Runtime fuses into INT8 kernels) or qoperator (QLinearConv, QLinearMatMul, ...).")
        activation_type: Literal["qint8", "quint8"] | None = Field(
            None, description="Static only: activation type. Unset: qint8 (S8S8) for QDQ on CPUs "
            "with fast INT8 dot products (VNNI, or not x86); quint8 (U8S8) on x86 without VNNI "
            "and for QOperator.")
        activation_symmetric: bool = Field(
            False, description="Static only: symmetric activation ranges (zero point 0) instead "
            "of asymmetric ones.")
        weight_type: Literal["qint8", "quint8"] = Field("qint8", description="Weight type.")
        reduce_range: bool | None = Field(
            None, description="7-bit weights: avoids saturation on x86 CPUs without VNNI. Unset: "
            "on exactly there (the hardware preflight decides).")
        op_types: list[str] | None = Field(
            None, description="Operator types to quantize; default: all ONNX Runtime supports.")
        op_types_to_exclude: list[str] = Field(
            default_factory=list, description="Operator types kept in FP32.")
        calibration_rows: int = Field(
            256, ge=1, description="Static only: most calibration rows used (the first ones).")
        calibration_chunk: int = Field(
            16, ge=1, description="Static only: rows per calibration batch; one batch's "
            "activations are held in memory at a time.")

        @model_validator(mode="after")
        def _combinable(self):
            """Refused when the request is read, not after other candidates were measured."""
            if self.activation_type == "qint8" and self.weight_type == "quint8":
                raise ValueError("activation_type 'qint8' with weight_type 'quint8' is a "
                                 "combination ONNX Runtime cannot quantize to; use quint8 "
                                 "activations or qint8 weights")
            if self.op_types is not None and set(self.op_types) <= set(self.op_types_to_exclude):
                raise ValueError(f"op_types_to_exclude {self.op_types_to_exclude} leaves none of "
                                 f"op_types {self.op_types} to quantize")
            return self

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        missing = [f for f in ("method", "per_channel") if getattr(config, f) is None]
        if config.method == "static" and config.calibrate_method is None:
            missing.append("calibrate_method")
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set when the pass runs (the search "
                              "sets them).", hint="Give them in the pass config, e.g. "
                              "{'method': 'static', 'per_channel': True, "
                              "'calibrate_method': 'minmax'}.")
        model = onnx.load(str(artifact.path))
        ops = Counter(n.op_type for n in model.graph.node)
        if not (_QUANTIZABLE & set(ops)):
            found = ", ".join(f"{k}" for k, _ in ops.most_common(4))
            raise PassSkipped(f"no operator INT8 can speed up (MatMul/Gemm/Conv/Attention); "
                              f"the graph has {found}")
        reduce_range = (ctx.hardware.int8_reduce_range if config.reduce_range is None
                        else config.reduce_range)
        done = (self._dynamic(artifact, config, ctx, reduce_range) if config.method == "dynamic"
                else self._static(artifact, config, ctx, model, reduce_range))
        quantized = check(done.path)
        after = Counter(n.op_type for n in quantized.graph.node)
        int8_ops = {k: v for k, v in after.items()
                    if k.endswith("Integer") or k.startswith("Q") or k.startswith("Dynamic")
                    or k == "DequantizeLinear"}
        notes = [done.summary + ": " + ", ".join(f"{k} x{v}" for k, v in sorted(int8_ops.items())),
                 *done.notes, left_in_fp32(quantized, config, done), ctx.hardware.int8_note]
        return artifact.then(done.path, self.name, config, notes=[n for n in notes if n],
                             meta={"precision": "int8"})

    def _dynamic(self, artifact: Artifact, config: Config, ctx: PassContext,
                 reduce_range: bool) -> _Done:
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        out = ctx.workdir / f"int8_{'pc' if config.per_channel else 'pt'}.onnx"
        with quiet():
            quantize_dynamic(
                str(artifact.path), str(out), per_channel=config.per_channel,
                reduce_range=reduce_range, weight_type=_quant_type(config.weight_type),
                op_types_to_quantize=op_types_for(config, IntegerOpsRegistry),
                nodes_to_exclude=config.nodes_to_exclude,
                # Fused graphs hold contrib ops shape inference cannot type: default to float.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        summary = (f"dynamic INT8 {'per-channel' if config.per_channel else 'per-tensor'}, "
                   f"reduce_range {'on' if reduce_range else 'off'}")
        return _Done(out, summary, supported=set(IntegerOpsRegistry))

    def _static(self, artifact: Artifact, config: Config, ctx: PassContext,
                model: onnx.ModelProto, reduce_range: bool) -> _Done:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        from optiserve.passes.calibration import (
            ChunkReader, PeakMemory, check_rows, model_inputs, typed_for_calibration)

        rows = ctx.calibration
        if rows is None:
            raise PassSkipped("static INT8 needs calibration data: give calibration_dataset (or "
                              "validation_dataset) in the request, or use method 'dynamic'")
        specs = model_inputs(model)
        available, batch = check_rows(rows, specs)
        n = min(available, config.calibration_rows)
        act = activation_type(config, ctx.hardware)
        qdq = config.quant_format == "qdq"
        supported = set(QLinearOpsRegistry) | (set(QDQRegistry) if qdq else set())
        # ONNX Runtime's own default list, made explicit so a retry can take types out of it.
        default_ops = set(QLinearOpsRegistry) | set(QDQRegistry)
        op_types = op_types_for(config, default_ops) or sorted(default_ops)
        typed = typed_for_calibration(model)
        source = artifact.path
        if typed is not model:
            source = ctx.workdir / "typed_for_calibration.onnx"
            onnx.save(typed, str(source))
        out = ctx.workdir / (f"int8_static_{config.quant_format}_{act}_{config.calibrate_method}_"
                             f"{'pc' if config.per_channel else 'pt'}.onnx")
        reader = ChunkReader(rows.inputs, specs, n, config.calibration_chunk, batch)
        tail = output_softmax(model, config)
        try:
            with PeakMemory() as memory:
                done = _static_with_retry(
                    source, out, typed, reader, op_types, config, tail,
                    quant_format="QDQ" if qdq else "QOperator", per_channel=config.per_channel,
                    reduce_range=reduce_range, activation_type=_quant_type(act),
                    weight_type=_quant_type(config.weight_type))
        finally:
            if source != artifact.path:
                source.unlink(missing_ok=True)
        done.summary = _static_summary(config, act, reduce_range, reader, rows.description,
                                       memory.text)
        done.supported, done.qdq = supported, qdq
        if tail:
            done.notes.append(f"kept the output Softmax {', '.join(tail)} in FP32: ONNX "
                              "Runtime quantizes a Softmax output on a fixed [0, 1] scale "
                              "(1/255 a step), which erases probabilities below that (on "
                              "MobileNetV2 the cosine to FP32 fell from 0.99 to 0.36)")
        return done


@dataclass
class _Done:
    """A quantized file, its summary, extra notes, what the retry left out, the op types ORT
    has INT8 kernels for in this mode, and whether the graph is QDQ."""

    path: Path
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    failed_nodes: list[str] = field(default_factory=list)
    failed_ops: list[str] = field(default_factory=list)
    supported: set[str] = field(default_factory=set)
    qdq: bool = False


def output_softmax(model: onnx.ModelProto, config: Quantization.Config) -> list[str]:
    """Softmax nodes that produce a model output, unless the caller chose the op types: ONNX
    Runtime quantizes a Softmax output on a fixed [0, 1] scale whatever the calibration saw, so
    a 1000-class softmax, whose probabilities are mostly below one step, loses most of its
    information."""
    if config.op_types is not None:
        return []
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Softmax" and n.name and set(n.output) & outputs
            and n.name not in config.nodes_to_exclude]


def _static_with_retry(source: Path, out: Path, typed: onnx.ModelProto, reader, op_types,
                       config: Quantization.Config, keep_float: list[str], *,
                       quant_format: str, **kwargs) -> _Done:
    """quantize_static (with `keep_float` nodes left out); when it fails on a node or tensor
    it can name, once more without it."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from optiserve.passes.calibration import failure_site

    calib = _CALIBRATION[config.calibrate_method]
    nodes, done = [*config.nodes_to_exclude, *keep_float], _Done(out)
    for attempt in (1, 2):
        reader.set_range(0, len(reader))
        try:
            with quiet():
                quantize_static(
                    str(source), str(out), reader, quant_format=getattr(QuantFormat, quant_format),
                    op_types_to_quantize=op_types, nodes_to_exclude=nodes,
                    calibrate_method=getattr(CalibrationMethod, calib), extra_options={
                        # One reader item (a chunk of rows) per collect_data call: the setting
                        # that bounds calibration memory (see calibration.py).
                        "CalibStridedMinMax": 1,
                        "CalibPercentile": config.percentile,
                        "ActivationSymmetric": config.activation_symmetric,
                        "DefaultTensorType": onnx.TensorProto.FLOAT}, **kwargs)
            return done
        except Exception as exc:  # noqa: BLE001 - ORT raises many types; all end the same way
            site = failure_site(exc, typed, set(op_types)) if attempt == 1 else None
            if site is None:
                after = f" (after {done.notes[0]})" if done.notes else ""
                raise PassSkipped(f"ONNX Runtime's static INT8 ({calib}) failed{after}: "
                                  f"{first_line(exc, 200)}") from None
            bad_nodes, bad_ops, where = site
            nodes += bad_nodes
            op_types = [o for o in op_types if o not in bad_ops]
            done.failed_nodes, done.failed_ops = bad_nodes, bad_ops
            done.notes = [f"retried without quantizing {', '.join(bad_nodes + bad_ops)}: the "
                          f"{calib} quantization failed on {where} ({first_line(exc, 120)})"]
            if not op_types:
                raise PassSkipped(done.notes[0] + "; nothing left to quantize") from None
    raise AssertionError("unreachable")  # the loop returns or raises


def _static_summary(config: Quantization.Config, act: str, reduce_range: bool, reader,
                    where: str, memory: str) -> str:
    calib = _CALIBRATION[config.calibrate_method]
    if calib == "Percentile":
        calib += f" ({config.percentile:g}%)"
    return (f"static INT8 {'QDQ' if config.quant_format == 'qdq' else 'QOperator'} "
            f"{_SHORT[act]}{_SHORT[config.weight_type]} "
            f"{'per-channel' if config.per_channel else 'per-tensor'}, reduce_range "
            f"{'on' if reduce_range else 'off'}, "
            f"{'symmetric' if config.activation_symmetric else 'asymmetric'} activations, "
            f"{calib} calibration on {reader.rows} rows of {where} in chunks of {reader.chunk}, "
            f"peak memory {memory}")


def activation_type(config: Quantization.Config, hardware: Hardware) -> str:
    """The configured activation type, else the fast one for this CPU and format.

    ONNX Runtime's QDQ default is S8S8; on x86 without VNNI its u8*s8 instruction wants U8S8
    (with reduce_range), and QOperator's kernels are written for U8S8."""
    if config.activation_type is not None:  # the Config refuses qint8 with quint8 weights
        return config.activation_type
    s8 = (config.quant_format == "qdq" and config.weight_type == "qint8"
          and not hardware.int8_reduce_range)  # i.e. not x86 known to lack VNNI
    return "qint8" if s8 else "quint8"


def op_types_for(config: Quantization.Config, default_ops) -> list[str] | None:
    """The op types to hand ONNX Runtime; None means its own default (all it supports)."""
    if not config.op_types_to_exclude:
        return config.op_types
    keep = [o for o in (config.op_types or sorted(default_ops))
            if o not in config.op_types_to_exclude]
    if not keep:  # ONNX Runtime reads an empty list as "all of them"
        raise PassSkipped(f"op_types_to_exclude {config.op_types_to_exclude} leaves no operator "
                          "type ONNX Runtime can quantize here")
    return keep


def left_in_fp32(model: onnx.ModelProto, config: Quantization.Config, done: _Done) -> str | None:
    """Which compute ops stayed float after quantizing, and why, as one note (None if none).

    A QDQ model keeps MatMul/Conv/Gemm nodes: those of a type ORT has a QDQ kernel for and fed
    by a DequantizeLinear run as INT8, the others in FP32. QOperator and dynamic models rename
    what they quantize (QLinearMatMul, MatMulInteger), so a node keeping its type is FP32."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear"
                   for o in n.output} if done.qdq else set()
    why: dict[str, Counter] = {}
    for node in model.graph.node:
        if node.op_type not in _COMPUTE or (
                node.op_type in done.supported and node.input and node.input[0] in dequantized):
            continue
        if (node.name in config.nodes_to_exclude or node.op_type in config.op_types_to_exclude
                or (config.op_types is not None and node.op_type not in config.op_types)):
            reason = "excluded by you"
        elif node.name in done.failed_nodes or node.op_type in done.failed_ops:
            reason = "ONNX Runtime's quantizer failed on it"
        elif node.op_type not in done.supported:
            reason = f"no {config.method} INT8 kernel in ONNX Runtime"
        else:
            reason = "ONNX Runtime's quantizer left it out" + (
                ", e.g. no calibration range for its input" if config.method == "static" else "")
        why.setdefault(reason, Counter())[node.op_type] += 1
    if not why:
        return None
    return "left in FP32: " + "; ".join(
        ", ".join(f"{op} x{k}" for op, k in sorted(c.items())) + f" ({reason})"
        for reason, c in why.items())


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "qint8" else QuantType.QUInt8


@contextlib.contextmanager
def quiet():
    """Keep the user's output clean: ONNX Runtime's quantizer logs advice on the root logger,
    its histogram calibrators print() per batch, and numpy warns on tensors with huge ranges.
    Redirecting stdout and the root logger's level are process-wide, so one quantization at a
    time holds them (a lock: two overlapping threads would otherwise restore each other's
    state in the wrong order and leave stdout closed)."""
    with _QUIET:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    np.errstate(all="ignore"):
                yield
        finally:
            root.setLevel(level)


_QUIET = threading.RLock()
