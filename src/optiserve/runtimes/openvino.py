"""OpenVINO runtime (CPU): reads the .ovz artifact (model.xml + model.bin) from memory.

Inference precision is pinned to f32: on CPUs with AMX or AVX512-BF16 OpenVINO otherwise runs
FP32 layers in bf16, so an "FP32" artifact would silently compute something else. (A bf16
candidate belongs in the search, measured and gated like the others.)"""

from __future__ import annotations

import zipfile

import numpy as np

from optiserve.core.deps import require
from optiserve.core.errors import ModelLoadError
from optiserve.runtimes.base import Runtime


class OpenVINORuntime(Runtime):
    name = "openvino"

    def load(self) -> None:
        ov = require("openvino", extra="openvino", feature="The OpenVINO runtime")
        try:
            with zipfile.ZipFile(self.path) as z:
                xml, weights = z.read("model.xml"), z.read("model.bin")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelLoadError(str(self.path), f"not an OpenVINO artifact ({exc})") from None
        core = ov.Core()
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
        self.compiled = core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()
        self._inputs = {p.get_any_name(): p.get_element_type().to_dtype()
                        for p in self.compiled.inputs}

    def predict(self, inputs, outputs=None):
        self.request.infer(self.feed(inputs, self._inputs,
                                     lambda a, dtype: np.ascontiguousarray(a, dtype=dtype)))
        names = [o.name for o in self.signature.outputs]
        result = {n: self.request.get_output_tensor(i).data.copy() for i, n in enumerate(names)}
        return {k: result[k] for k in (outputs or names)}

    def unload(self) -> None:
        self.request = self.compiled = None
