"""ONNX Runtime, CPU execution provider, with threads pinned to the number asked for."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from optiserve.core.errors import ModelLoadError, first_line
from optiserve.runtimes.base import Runtime


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def load(self) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types per failure
            raise ModelLoadError(str(self.path),
                                 f"ONNX Runtime cannot open it ({first_line(exc)})") from None
        self._types = {i.name: i.type for i in self.session.get_inputs()}

    def predict(self, inputs, outputs=None):
        feed = self.feed(inputs, self._types, _cast)
        names = outputs or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def unload(self) -> None:
        self.session = None

    def metadata(self):
        return {**super().metadata(), "providers": ["CPUExecutionProvider"]}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16, "tensor(bool)": np.bool_,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _cast(array: np.ndarray, kind: str) -> np.ndarray:
    dtype = _ORT_TYPES.get(kind)
    if dtype is None or array.dtype == dtype:
        return array
    return np.ascontiguousarray(array, dtype=dtype)
