"""scikit-learn's own predict/predict_proba: the baseline an ONNX artifact is measured against."""

from __future__ import annotations

import warnings

import numpy as np

from optiserve.convert.sklearn import load_estimator
from optiserve.runtimes.base import Runtime


class SklearnRuntime(Runtime):
    name = "sklearn"

    def load(self) -> None:
        self.model = load_estimator(self.path, self.format)
        # a model fitted on a DataFrame warns on every call with plain arrays (which is how
        # optiserve feeds it, in the fitted column order): once per server is enough
        warnings.filterwarnings("once", message="X does not have valid feature names")

    def predict(self, inputs, outputs=None):
        x = next(iter(inputs.values()))
        wanted = outputs or [o.name for o in self.signature.outputs]
        out: dict[str, np.ndarray] = {}
        if "label" in wanted or "variable" in wanted:
            pred = np.asarray(self.model.predict(x))
            if "variable" in wanted:
                out["variable"] = pred.reshape(len(pred), -1)
            else:
                out["label"] = pred
        if "probabilities" in wanted:
            out["probabilities"] = np.asarray(self.model.predict_proba(x))
        return out

    def unload(self) -> None:
        self.model = None
