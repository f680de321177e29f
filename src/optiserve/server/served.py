"""One loaded model version (`ServedVersion`): its runtime instances behind a dynamic batcher,
its input checks, its counters, and its metadata and configuration in the protocol's shapes.
The data plane (dataplane.py) loads, routes to and unloads them.
"""

from __future__ import annotations

import numpy as np

from optiserve.core.errors import OptiserveError
from optiserve.core.types import Signature, TensorSpec
from optiserve.registry.deployments import DeploymentSpec
from optiserve.registry.registry import VersionInfo
from optiserve.runtimes.base import Runtime
from optiserve.server.batching import Batcher
from optiserve.server.metrics import Metrics, VersionStats
from optiserve.server.tensors import TensorError, check_input, datatype, platform


class LoadFailed(OptiserveError):
    """A deployment could not be loaded; what served before still serves. It answers as its
    `cause` does (an unknown model stays a 404 / NOT_FOUND)."""

    def __init__(self, name: str, cause: OptiserveError, serving: bool):
        super().__init__(f"Deployment '{name}' did not load: {cause}",
                         hint="What served before still serves." if serving else None)
        self.name, self.cause = name, cause


class ServedVersion:
    """One loaded model version: its instances behind a batcher, and its counters."""

    def __init__(self, name: str, info: VersionInfo, spec: DeploymentSpec,
                 runtimes: list[Runtime], max_batch_size: int, metrics: Metrics):
        self.name, self.info, self.spec = name, info, spec
        self.version = str(info.version)
        self.signature: Signature = info.signature
        self.inputs = {t.name: t for t in info.signature.inputs}
        self.outputs = {t.name: t for t in info.signature.outputs}
        self.runtimes = runtimes
        self.max_batch_size = max_batch_size
        self.stats = VersionStats(metrics, name, self.version)
        self.batcher = Batcher(
            name, [r.predict for r in runtimes], max_batch_size=max_batch_size,
            max_queue_delay_us=spec.max_queue_delay_us,
            preferred_batch_sizes=spec.preferred_batch_sizes,
            max_queue_size=spec.max_queue_size,
            timeout_s=spec.timeout_ms / 1000 or None,
            on_batch=lambda b: self.stats.batch(b.rows, b.requests, b.queue_s, b.compute_s))
        metrics.queue_depth.labels(name, self.version).set_function(self.batcher.depth)

    def check(self, inputs: dict[str, tuple[np.ndarray, str]],
              outputs: list[str] | None) -> dict[str, np.ndarray]:
        """Inputs (array, V2 datatype) fit the model; the arrays, in the model's order."""
        if inputs.keys() != self.inputs.keys():
            unknown = [n for n in inputs if n not in self.inputs]
            if unknown:
                raise TensorError(f"Model '{self.name}' has no input '{unknown[0]}'.",
                                  hint=f"Its inputs: {', '.join(self.inputs)}.")
            missing = [n for n in self.inputs if n not in inputs]
            raise TensorError(f"Input '{missing[0]}' of model '{self.name}' is missing.",
                              hint=f"Its inputs: {', '.join(self.inputs)}.")
        for name in outputs or ():
            if name not in self.outputs:
                raise TensorError(f"Model '{self.name}' has no output '{name}'.",
                                  hint=f"Its outputs: {', '.join(self.outputs)}.")
        arrays = {}
        rows = None
        for name, spec in self.inputs.items():
            array, given = inputs[name]
            check_input(spec, array, given, allow_nan=self.spec.allow_nan)
            if spec.dtype == "str":
                array = _text(name, array)
            if self.max_batch_size and array.ndim:
                if rows is not None and array.shape[0] != rows:
                    raise TensorError(f"Input '{name}' has {array.shape[0]} rows but the "
                                      f"other inputs have {rows}; every input carries the "
                                      "same batch.")
                rows = array.shape[0]
            arrays[name] = array
        return arrays

    def config(self) -> dict:
        """The model configuration extension (`GET /v2/models/{m}/config`), Triton's shape."""
        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "data_type": "TYPE_" + _triton_type(t.dtype),
                     "dims": list(t.shape[1:] if self.max_batch_size else t.shape)}
                    for t in specs]

        s = self.spec
        config = {"name": self.name, "platform": platform(self.info.format),
                  "backend": self.runtimes[0].name, "max_batch_size": self.max_batch_size,
                  "input": tensors(self.signature.inputs),
                  "output": tensors(self.signature.outputs),
                  "instance_group": [{"count": s.instances, "kind": "KIND_CPU"}],
                  "version_policy": ({"latest": {"num_versions": s.versions.latest}}
                                     if s.versions.specific is None
                                     else {"specific": {"versions": s.versions.specific}}),
                  "parameters": {"threads_per_instance": {
                      "string_value": str(self.runtimes[0].threads)}}}
        if self.max_batch_size:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": s.max_queue_delay_us,
                "preferred_batch_size": s.preferred_batch_sizes,
                "default_queue_policy": {"max_queue_size": s.max_queue_size,
                                         "default_timeout_microseconds": s.timeout_ms * 1000}}
        return config

    def metadata(self) -> dict:
        """Model metadata (`GET /v2/models/{m}[/versions/{v}]`)."""

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
            return [{"name": t.name, "datatype": datatype(t.dtype), "shape": list(t.shape)}
                    for t in specs]

        return {"name": self.name, "versions": [self.version],
                "platform": platform(self.info.format),
                "inputs": tensors(self.signature.inputs),
                "outputs": tensors(self.signature.outputs)}

    def close(self, drain: bool = True) -> None:
        self.batcher.close(drain=drain)
        for r in self.runtimes:
            r.unload()



def _text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as str for a text input: runtimes (ONNX Runtime's string tensors,
    scikit-learn) take str, and ONNX Runtime would turn b'abc' into the text "b'abc'"."""
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, x in enumerate(array.reshape(-1)):
        try:
            flat[i] = x.decode() if isinstance(x, bytes) else x
        except UnicodeDecodeError:
            raise TensorError(f"Input '{name}' is text, but its element {i} is not UTF-8.",
                              hint="Send text inputs as UTF-8 strings.") from None
    return out


def _triton_type(dtype: str) -> str:
    name = datatype(dtype)
    return {"BYTES": "STRING"}.get(name, name)
