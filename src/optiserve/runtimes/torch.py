"""PyTorch: TorchScript and torch.export programs run by torch itself (the eager baseline)."""

from __future__ import annotations

import numpy as np

from optiserve.convert.torch import load_runnable
from optiserve.core.deps import require
from optiserve.runtimes.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def load(self) -> None:
        self.torch = require("torch", extra="torch", feature="Running a PyTorch model")
        self.torch.set_num_threads(self.threads)
        self.module = load_runnable(self.path, self.format)

    def predict(self, inputs, outputs=None):
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name]))
                for s in self.signature.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, dict):
            result = tuple(result.values())
        names = [o.name for o in self.signature.outputs]
        out = {n: r.detach().numpy() for n, r in zip(names, result)}
        return {k: out[k] for k in (outputs or names) if k in out}

    def unload(self) -> None:
        self.module = None
