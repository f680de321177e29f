"""LiteRT (TensorFlow Lite) runtime: runs `.tflite` files with the `ai_edge_litert` interpreter.

A TFLite interpreter has fixed input shapes (the converter writes batch 1), so a batch of
another size needs `resize_tensor_input` + `allocate_tensors`, and XNNPACK then re-plans its
kernels on the next invoke (~20 % of a MobileNetV2 call here). The runtime therefore keeps one
interpreter per input shape (a few, least recently used first out): a server that sends
batch 1 and batch 8 in turn pays the re-plan once per shape, not once per call.

Callers always see the source model's float API: inputs and outputs are keyed by the optiserve
signature's names, and int8/uint8 tensors of a full-integer model are quantized on the way in
and dequantized on the way out with the tensor's own (scale, zero point). TFLite renames tensors
(`serving_default_x:0`, signature outputs `output_0`...), so names are matched through the
model's signature runner when they agree, else by position.

Models with TF Select ("Flex") ops need the Flex delegate, which neither the LiteRT wheel nor
tf.lite.Interpreter in Python carries: load() says so and names the ops.
"""

from __future__ import annotations

import importlib
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from optiserve.core.deps import available, require
from optiserve.core.errors import DatasetError, MissingExtraError, ModelLoadError, first_line
from optiserve.core.quiet import fd_to_log
from optiserve.runtimes.base import Runtime

#: interpreters kept per runtime, one per distinct set of input shapes
MAX_SHAPES = 8
SERVING = "serving_default"
FLEX_HINT = ("Export with --format ort or --format openvino, or replace the layer that uses "
             "them; a Flex-enabled TFLite runtime (e.g. Android's tensorflow-lite-select-tf-ops) "
             "can run the file, but not optiserve's Python LiteRT interpreter.")


@dataclass(frozen=True)
class Port:
    """One model input or output: the signature name, the TFLite tensor and its quantization."""

    name: str
    index: int
    dtype: Any
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


def interpreter_class() -> tuple[type, str]:
    """The LiteRT Interpreter and a label naming it (for notes and errors); TensorFlow's
    deprecated tf.lite.Interpreter only where ai_edge_litert is missing but TF is installed."""
    try:
        require("ai_edge_litert", extra="tensorflow",
                feature="The LiteRT (TensorFlow Lite) runtime")
    except MissingExtraError:
        if not available("tensorflow"):
            raise
        tf = importlib.import_module("tensorflow")
        return tf.lite.Interpreter, f"tf.lite.Interpreter (TensorFlow {tf.__version__})"
    from importlib.metadata import PackageNotFoundError, version

    module = importlib.import_module("ai_edge_litert.interpreter")
    try:
        label = f"LiteRT (ai-edge-litert {version('ai-edge-litert')})"
    except PackageNotFoundError:  # a source build without package metadata
        label = "LiteRT (ai_edge_litert)"
    return module.Interpreter, label


def flex_ops(interpreter: Any) -> list[str]:
    """TF Select ops of a model (`FlexCumprod` -> `Cumprod`); readable before allocation."""
    ops = [d.get("op_name", "") for d in interpreter._get_ops_details()]
    return sorted({op[len("Flex"):] for op in ops if op.startswith("Flex")})


class LiteRTRuntime(Runtime):
    """Runs a .tflite file at any batch size, with the float API of the model it came from."""

    name = "litert"

    def load(self) -> None:
        self._cls, self.interpreter_name = interpreter_class()
        first = self._open()
        self._inputs, self._outputs = _ports(first, self.signature, self.path)
        shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in first.get_input_details()}
        key = tuple(shapes[p.index] for p in self._inputs)
        self._by_shape: OrderedDict[tuple, Any] = OrderedDict({key: first})
        self._lock = threading.Lock()

    def _open(self) -> Any:
        """A new interpreter with its tensors allocated; Flex ops and bad files named."""
        interpreter = self._new()
        try:
            # the first allocation in a process prints "INFO: Created TensorFlow Lite XNNPACK
            # delegate for CPU." from C++: to the debug log
            with fd_to_log("LiteRT", once="litert-xnnpack"):
                interpreter.allocate_tensors()
        except RuntimeError as exc:
            flex = flex_ops(interpreter)
            if flex:
                raise ModelLoadError(
                    str(self.path), f"it uses the TF Select (Flex) op(s) {', '.join(flex)}, and "
                    f"{self.interpreter_name} has no Flex delegate to run them",
                    hint=FLEX_HINT) from None
            raise ModelLoadError(str(self.path), f"{self.interpreter_name} cannot prepare it "
                                 f"({first_line(exc)})") from None
        return interpreter

    def _new(self) -> Any:
        try:
            with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation warning
                warnings.simplefilter("ignore")
                interpreter = self._cls(model_path=str(self.path), num_threads=self.threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(str(self.path), f"{self.interpreter_name} cannot read it "
                                 f"({first_line(exc)})",
                                 hint="Is it a .tflite file? Convert it again.") from None
        return interpreter

    def predict(self, inputs, outputs=None):
        wanted = {p.name: p for p in self._inputs}
        feed = self.feed(inputs, wanted, _to_tensor)
        key = tuple(feed[p.name].shape for p in self._inputs)
        names = outputs or [p.name for p in self._outputs]
        ports = {p.name: p for p in self._outputs}
        with self._lock:
            interpreter = self._interpreter_for(key)
            for port in self._inputs:
                interpreter.set_tensor(port.index, feed[port.name])
            interpreter.invoke()
            return {n: _from_tensor(interpreter.get_tensor(ports[n].index), ports[n])
                    for n in names}

    def _interpreter_for(self, key: tuple) -> Any:
        """The interpreter allocated for these input shapes: cached, else a new one resized."""
        interpreter = self._by_shape.get(key)
        if interpreter is not None:
            self._by_shape.move_to_end(key)
            return interpreter
        interpreter = self._new()  # allocated once, at its new shapes
        try:
            for port, shape in zip(self._inputs, key):
                interpreter.resize_tensor_input(port.index, list(shape))
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            shapes = ", ".join(f"{p.name} {list(s)}" for p, s in zip(self._inputs, key))
            expected = ", ".join(f"{s.name} {list(s.shape)}" for s in self.signature.inputs)
            raise DatasetError(f"The model cannot take inputs of shape {shapes} "
                               f"({first_line(exc)}).",
                               hint=f"It takes {expected} (-1: any size).") from None
        self._by_shape[key] = interpreter
        if len(self._by_shape) > MAX_SHAPES:
            self._by_shape.popitem(last=False)
        return interpreter

    def unload(self) -> None:
        self._by_shape = OrderedDict()

    def metadata(self):
        quantized = {p.name: {"dtype": np.dtype(p.dtype).name, "scale": p.scale,
                              "zero_point": p.zero_point}
                     for p in (*self._inputs, *self._outputs) if p.quantized} \
            if hasattr(self, "_inputs") else {}
        return {**super().metadata(), "interpreter": getattr(self, "interpreter_name", None),
                "quantized_tensors": quantized}


def _ports(interpreter: Any, signature, path) -> tuple[list[Port], list[Port]]:
    """Signature names -> TFLite tensors: through the model's signature runner (by name where
    the names agree, else `output_N` by N), else by the interpreter's tensor order."""
    by_sig_in, by_sig_out = _signature_details(interpreter)
    plain_in, plain_out = interpreter.get_input_details(), interpreter.get_output_details()
    want_in = [s.name for s in signature.inputs]
    want_out = [s.name for s in signature.outputs]
    if len(plain_in) != len(want_in) or len(plain_out) != len(want_out):
        raise ModelLoadError(str(path), f"it has {len(plain_in)} input(s) and {len(plain_out)} "
                             f"output(s), the signature {len(want_in)} and {len(want_out)}",
                             hint="Register the .tflite file again so its signature is read "
                             "from it.")
    # inputs: the signature def lists them sorted by name, the subgraph in the function's order
    ins = (_match(want_in, by_sig_in) or list(zip(want_in, plain_in)))
    outs = (_match(want_out, by_sig_out)
            or _match_numbered(want_out, by_sig_out) or list(zip(want_out, plain_out)))
    return [_port(n, d) for n, d in ins], [_port(n, d) for n, d in outs]


def _signature_details(interpreter: Any) -> tuple[dict, dict]:
    """{name: tensor details} of the serving signature's inputs and outputs ({} without one)."""
    keys = list(interpreter.get_signature_list())
    key = SERVING if SERVING in keys else (keys[0] if len(keys) == 1 else None)
    if key is None:
        return {}, {}
    runner = interpreter.get_signature_runner(key)
    return runner.get_input_details(), runner.get_output_details()


def _match(names: list[str], details: dict) -> list[tuple[str, dict]] | None:
    if details and set(names) == set(details):
        return [(n, details[n]) for n in names]
    return None


def _match_numbered(names: list[str], details: dict) -> list[tuple[str, dict]] | None:
    """TFLite names a function's outputs output_0, output_1, ... in its return order."""
    numbered = {int(m.group(1)): d for k, d in details.items()
                if (m := re.fullmatch(r"output_(\d+)", k))}
    if details and len(numbered) == len(details) == len(names):
        return [(n, numbered[i]) for i, n in enumerate(names)]
    return None


def _port(name: str, detail: dict) -> Port:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return Port(name=name, index=int(detail["index"]), dtype=np.dtype(detail["dtype"]).type,
                scale=float(scale), zero_point=int(zero_point))


def _to_tensor(array: np.ndarray, port: Port) -> np.ndarray:
    """The caller's array as the tensor takes it: floats quantized for an integer tensor."""
    array = np.asarray(array)
    if port.quantized and array.dtype.kind == "f":
        info = np.iinfo(port.dtype)
        q = np.round(array / port.scale) + port.zero_point
        return np.ascontiguousarray(np.clip(q, info.min, info.max), dtype=port.dtype)
    return np.ascontiguousarray(array, dtype=port.dtype)


def _from_tensor(array: np.ndarray, port: Port) -> np.ndarray:
    """An output as the source model gave it: integer tensors dequantized to float32."""
    if port.quantized:
        return ((array.astype(np.float32) - port.zero_point) * np.float32(port.scale))
    return array
