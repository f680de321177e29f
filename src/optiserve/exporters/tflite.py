"""TensorFlow Lite: a `.tflite` file for phones, microcontrollers and edge accelerators, run here
by the LiteRT interpreter (runtimes/litert.py).

TFLiteConverter reads the Keras model or the SavedModel directly (no ONNX in between). Four
precisions: float32; "dynamic" (int8 weights, activations quantized on the fly); float16
weights; and post-training INT8 calibrated on the calibration rows, full-integer with int8 input and
output tensors by default, as integer-only NPUs and the Edge TPU need. The exported version keeps
the source's float signature: the runtime quantizes inputs and dequantizes outputs, so it is
served with the same API.

Tolerances, from outputs measured against Keras eager on this project's machine (a small CNN
trained 12 epochs on sklearn's digits, 92 % accurate, on 200 held-out rows; MobileNetV2 logits,
random weights, BatchNorm statistics set from data, 160 px / 96 px; mean cosine per row):

| precision | digits CNN | MobileNetV2 160 px / 96 px | tolerance |
| --- | --- | --- | --- |
| float32 | max abs 1.9e-6 (logits up to 7.4) | max abs 1.5e-5 / 3.0e-5 | atol 1e-4 + rtol 1e-4 |
| float16 | cosine 1.00000 | 0.99991 / 0.99985 | cosine >= 0.999 |
| dynamic | cosine 0.99997, argmax 100 % | 0.987 / 0.977 | cosine >= 0.97 |
| int8 | cosine 0.9990, argmax 99 % | 0.960 / 0.934, argmax 35-60 % | cosine >= 0.95, argmax >= 90 % |

(The same CNN after 5 epochs, 72 % accurate, keeps 96 % arg-max agreement in INT8.) A random
network's class scores are near ties, so its INT8 arg-max flips and its export is refused, as a
trained model that quantized that badly would be.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optiserve.core.errors import ModelLoadError, first_line
from optiserve.core.quiet import fd_to_log
from optiserve.exporters.base import Exported, Exporter, ExportError, Source, Tolerance

log = logging.getLogger(__name__)

TOLERANCES = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(min_cosine=0.999),
    "dynamic": Tolerance(min_cosine=0.97),
    "int8": Tolerance(min_cosine=0.95, min_label_agreement=0.90),
}
_OTHER_FORMATS = "--format ort or --format openvino"


class TFLiteExporter(Exporter):
    format = "tflite"
    reads = ("keras", "savedmodel")
    framework = "tflite"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        quantization: Literal["float32", "dynamic", "float16", "int8"] = Field(
            "float32", description="float32: no quantization; dynamic: int8 weights, "
            "activations quantized at run time; float16: float16 weights; int8: int8 weights and "
            "activations calibrated on the calibration rows.")
        int8_io: bool = Field(
            True, description="int8 only. True: full-integer model with int8 input and output "
            "tensors (integer-only NPUs, Edge TPU); every op must have an int8 kernel. False: "
            "float32 input/output, ops without an int8 kernel stay float. Either way optiserve "
            "feeds and returns float32.")
        representative_rows: int = Field(
            100, ge=1, description="int8 only: the most calibration rows used as the representative "
            "(calibration) dataset.")
        select_tf_ops: bool = Field(
            False, description="Allow TensorFlow ops TFLite builtins lack, as TF Select (Flex) "
            "ops; the file then needs a TFLite runtime with the Flex delegate.")

    def export(self, source: Source, config: Config) -> Exported:
        tf = _tensorflow()
        rows = _representative(source, config)
        with _converter(source, tf) as (converter, origin):
            _configure(converter, config, rows, tf)
            model = _convert(converter, config)
        out = source.workdir / "model.tflite"
        out.write_bytes(model)
        quantized = _check_runs(out, source)
        notes = [_note(tf, origin, config, rows, source, len(model), quantized)]
        notes += _softmax_outputs(quantized, source)
        if rows is not None and "synthetic" in source.calibration_described:
            notes.append("INT8 calibrated on synthetic rows is only as good as those rows: pass "
                         "data from the real input distribution to calibrate on it.")
        meta = {"tflite": {"quantization": config.quantization, "tensorflow": tf.__version__,
                           "quantized_tensors": quantized}}
        # the runtime quantizes inputs and dequantizes outputs: the source's float API stays
        return Exported(path=out, signature=source.signature,
                        tolerance=TOLERANCES[config.quantization], notes=notes, meta=meta)


def _tensorflow():
    from optiserve.convert.tensorflow import import_tf

    return import_tf("TensorFlow Lite export")


@contextlib.contextmanager
def _converter(source: Source, tf) -> Iterator[tuple[Any, str]]:
    """A TFLiteConverter for the source, and a phrase naming what it reads. A SavedModel stays
    unpacked until the conversion is done (the converter reads its variables lazily)."""
    from optiserve.convert.tensorflow import load_keras, unpacked_savedmodel

    if source.format == "keras":
        yield tf.lite.TFLiteConverter.from_keras_model(load_keras(source.path)), "the Keras model"
        return
    with unpacked_savedmodel(source.path) as folder:
        yield (tf.lite.TFLiteConverter.from_saved_model(str(folder)),
               "the SavedModel's serving signature")


def _representative(source: Source, config: TFLiteExporter.Config) -> dict | None:
    """The calibration rows (int8 only): at most `representative_rows` of them, in the
    signature's dtypes; ExportError when there are none."""
    if config.quantization != "int8":
        return None
    n = min((len(v) for v in source.calibration.values()), default=0)
    if n == 0:
        raise ExportError("INT8 TensorFlow Lite export needs representative rows to calibrate "
                          "on, and the calibration data has none.",
                          hint="Pass calibration rows (data), or choose quantization float16 or "
                          "dynamic, which need none.")
    n = min(n, config.representative_rows)
    return {s.name: np.asarray(source.calibration[s.name][:n], dtype=s.dtype)
            for s in source.signature.inputs}


def _configure(converter, config: TFLiteExporter.Config, rows: dict | None, tf) -> None:
    """Precision, op sets and (int8) the representative dataset, as TFLiteConverter takes them."""
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if config.quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if config.quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if config.quantization == "int8":
        converter.representative_dataset = _one_row_at_a_time(rows)
        if config.int8_io:
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    if config.select_tf_ops:
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    converter.target_spec.supported_ops = ops


def _one_row_at_a_time(rows: dict[str, np.ndarray]):
    """The calibrator's dataset: a list per sample, inputs in signature order (the order of
    the converted graph's inputs, for Keras models and for SavedModels alike)."""
    names = list(rows)
    n = len(rows[names[0]])

    def dataset():
        for i in range(n):
            yield [rows[name][i:i + 1] for name in names]

    return dataset


def _convert(converter, config: TFLiteExporter.Config) -> bytes:
    """Run the converter; its chatter (Python's stdout, and the C++ lines such as
    "fully_quantize: 0, inference_type: 6, ..." written to fd 2) goes to the debug log, its
    failures become one ExportError naming the ops TFLite lacks."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), fd_to_log("TFLiteConverter"), \
                warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": the int8 I/O scales come from
            # calibration, which is what we want
            warnings.simplefilter("ignore", UserWarning)
            return converter.convert()
    except Exception as exc:  # ConverterError, ValueError from calibration, ...
        raise conversion_error(str(exc), config) from None
    finally:
        if chatter.getvalue().strip():
            log.debug("TFLiteConverter: %s", chatter.getvalue().strip())


def conversion_error(text: str, config: TFLiteExporter.Config) -> ExportError:
    """The converter's message (pages of MLIR) as one line: which ops, and what to do."""
    select = _listed("TF Select ops", text)
    custom = _listed("Custom ops", text)
    if custom:
        return ExportError(f"TensorFlow Lite has no kernel for the TensorFlow op(s) {custom}, "
                           "neither builtin nor as a TF Select op (select_tf_ops would not "
                           "help).", hint=f"Export with {_OTHER_FORMATS}, or replace the layer "
                           "that uses them.")
    if select:
        return ExportError(f"TensorFlow Lite builtins lack the TensorFlow op(s) {select}.",
                           hint="Set select_tf_ops=true to embed them as TF Select (Flex) ops "
                           "(the file then needs a Flex-enabled TFLite runtime), or export "
                           f"with {_OTHER_FORMATS}.")
    line = _error_line(text)
    if config.quantization == "int8" and config.int8_io:
        hint = ("Set int8_io=false to keep ops without an int8 kernel in float, or use "
                "quantization dynamic or float16.")
    else:
        hint = f"Try another quantization, or export with {_OTHER_FORMATS}."
    return ExportError(f"TFLiteConverter cannot convert this model: {line}", hint=hint)


def _listed(label: str, text: str) -> str | None:
    m = re.search(rf"{label}: ([^\n]+)", text)
    return m.group(1).strip() if m else None


def _error_line(text: str) -> str:
    """The first 'error: ...' line of an MLIR diagnostic, without its location prefix."""
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()[:300]
    return first_line(Exception(text)) if text.strip() else "no message"


def _softmax_outputs(quantized: dict[str, dict], source: Source) -> list[str]:
    """A note for int8 outputs on TFLite's fixed softmax quantization (scale 1/256, zero point
    -128): whatever the calibration saw, probabilities below one step are lost."""
    outputs = {o.name for o in source.signature.outputs}
    fixed = [name for name, q in quantized.items() if name in outputs
             and abs(q["scale"] - 1 / 256) < 1e-9 and q["zero_point"] == -128]
    if not fixed:
        return []
    return [f"output {', '.join(fixed)} holds softmax probabilities on TFLite's fixed int8 "
            "scale (1/256 a step), so probabilities below 0.004 read as 0: to rank or compare "
            "small probabilities, export the logits (Keras: classifier_activation=None) and "
            "apply softmax after."]


def _check_runs(path, source: Source) -> dict[str, dict]:
    """Open the file in the LiteRT runtime (which names Flex ops it cannot run); returns the
    quantization (dtype, scale, zero point) of its integer input/output tensors."""
    from optiserve.runtimes.litert import LiteRTRuntime

    runtime = LiteRTRuntime(path, source.signature, threads=1, format="tflite")
    try:
        runtime.load()
    except ModelLoadError as exc:
        raise ExportError(f"The TensorFlow Lite file was written, but {exc.reason}, so it "
                          "cannot be verified or served here.", hint=exc.hint) from None
    try:
        return runtime.metadata()["quantized_tensors"]
    finally:
        runtime.unload()


def _note(tf, origin: str, config: TFLiteExporter.Config, rows: dict | None, source: Source,
          size: int, quantized: dict[str, dict]) -> str:
    """What was made, from what, and (int8) calibrated on what."""
    what = {"float32": "float32",
            "dynamic": "dynamic-range quantization (int8 weights, activations quantized at "
                       "run time)",
            "float16": "float16 weights",
            "int8": ("full-integer INT8 with int8 input/output" if config.int8_io
                     else "INT8 with float32 input/output (ops without an int8 kernel stay "
                          "float)")}[config.quantization]
    note = f"TFLiteConverter (TF {tf.__version__}) from {origin}, {what}"
    if rows is not None:
        n = len(next(iter(rows.values())))
        note += f", calibrated on {n} rows of {source.calibration_described}"
    if quantized:
        note += "; integer tensors " + ", ".join(
            f"{name} {q['dtype']} (scale {q['scale']:.3g}, zero point {q['zero_point']})"
            for name, q in quantized.items()) + " (the runtime converts from/to float32)"
    if config.select_tf_ops:
        note += "; TF Select ops allowed"
    return note + (f"; {size / 1e6:.2f} MB." if size >= 100_000 else f"; {size / 1e3:.1f} kB.")
