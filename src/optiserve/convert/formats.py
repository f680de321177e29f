"""The model formats optiserve stores and the `Imported` type every converter returns.

detect.py decides a file's or object's format and dispatches to the converter for it
(sklearn.py, trees.py, torch.py, tensorflow.py, onnx_io.py); the converters return an
`Imported`, defined here so that none of them imports the dispatcher that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optiserve.core.types import Signature

#: the formats of a PyTorch network (the training passes read them)
TORCH_FORMATS = ("torchscript", "pt2")
# format -> extension used when storing the artifact
EXTENSIONS = {"onnx": ".onnx", "pkl": ".pkl", "skops": ".skops", "torchscript": ".pt",
              "pt2": ".pt2", "openvino": ".ovz", "xgboost": ".json", "xgboost_ubj": ".ubj",
              "lightgbm": ".txt", "keras": ".keras", "savedmodel": ".savedmodel.zip",
              "tflite": ".tflite", "ort": ".ort"}
FRAMEWORKS = {"onnx": "onnx", "pkl": "sklearn", "skops": "sklearn", "torchscript": "torch",
              "pt2": "torch", "openvino": "openvino", "xgboost": "xgboost",
              "xgboost_ubj": "xgboost", "lightgbm": "lightgbm", "keras": "tensorflow",
              "savedmodel": "tensorflow", "tflite": "tflite", "ort": "onnx"}

@dataclass
class Imported:
    """A model ready to store: the file, its format, framework, signature and facts about it."""

    path: Path
    format: str
    signature: Signature
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def framework(self) -> str:
        return FRAMEWORKS[self.format]
