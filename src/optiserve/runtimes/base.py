"""The Runtime interface (load / predict / unload / metadata) and the lazy name registry.

Runtimes are peers: ONNX Runtime is one of them, not the only one. The server and the search
run whichever runtime's artifact measured fastest.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.core.errors import DatasetError, UnknownNameError
from optiserve.core.types import Signature

RUNTIMES: dict[str, str] = {
    "onnxruntime": "optiserve.runtimes.onnxruntime:OnnxRuntime",
    "sklearn": "optiserve.runtimes.sklearn:SklearnRuntime",
    "torch": "optiserve.runtimes.torch:TorchRuntime",
    "openvino": "optiserve.runtimes.openvino:OpenVINORuntime",
    "xgboost": "optiserve.runtimes.trees:XGBoostRuntime",
    "lightgbm": "optiserve.runtimes.trees:LightGBMRuntime",
    "tensorflow": "optiserve.runtimes.tensorflow:TensorFlowRuntime",
    "litert": "optiserve.runtimes.litert:LiteRTRuntime",
}
# artifact format -> runtime that runs it natively
FORMAT_RUNTIME = {"onnx": "onnxruntime", "pkl": "sklearn", "skops": "sklearn",
                  "torchscript": "torch", "pt2": "torch", "openvino": "openvino",
                  "xgboost": "xgboost", "xgboost_ubj": "xgboost", "lightgbm": "lightgbm",
                  "keras": "tensorflow", "savedmodel": "tensorflow", "tflite": "litert",
                  # ONNX Runtime's mobile format (.ort) runs in the same runtime
                  "ort": "onnxruntime"}


class Runtime(ABC):
    """Runs one artifact. `predict` takes and returns dicts of numpy arrays keyed by name."""

    name: str = "runtime"

    def __init__(self, path: Path, signature: Signature, *, threads: int, format: str):
        self.path, self.signature, self.threads, self.format = path, signature, threads, format

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray],
                outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch. `outputs` limits what is computed (e.g. only the label)."""

    def unload(self) -> None:
        """Free what load() took."""

    @staticmethod
    def feed(inputs: dict[str, np.ndarray], wanted: dict[str, Any],
             cast: Callable[[np.ndarray, Any], np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs a runtime takes (name -> its type), each cast; a missing one is named."""
        missing = [n for n in wanted if n not in inputs]
        if missing:
            raise DatasetError(f"Input '{missing[0]}' is missing.",
                               hint=f"The model takes: {', '.join(wanted)}.")
        return {name: cast(inputs[name], kind) for name, kind in wanted.items()}

    def metadata(self) -> dict[str, Any]:
        return {"runtime": self.name, "threads": self.threads, "format": self.format,
                "signature": self.signature.model_dump(mode="json")}

    def __enter__(self) -> Runtime:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


def runtime_for(format: str) -> str:
    if format not in FORMAT_RUNTIME:
        raise UnknownNameError("artifact format", format, FORMAT_RUNTIME)
    return FORMAT_RUNTIME[format]


def load_runtime(path: Path, signature: Signature, *, format: str, threads: int,
                 name: str | None = None) -> Runtime:
    """Build (not yet load) the runtime `name`, or the native one for `format`."""
    name = name or runtime_for(format)
    if name not in RUNTIMES:
        raise UnknownNameError("runtime", name, RUNTIMES)
    module, _, cls = RUNTIMES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(path, signature, threads=threads,
                                                         format=format)
