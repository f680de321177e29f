"""XGBoost's and LightGBM's own predict: the baseline a converted tree ensemble is measured
against (the framework the user trained with, not an ONNX stand-in)."""

from __future__ import annotations

import numpy as np

from optiserve.convert.trees import info, load_booster, predict
from optiserve.runtimes.base import Runtime


class _TreesRuntime(Runtime):
    def load(self) -> None:
        self.booster = load_booster(self.path, self.format)
        self.info = info(self.booster)
        if self.info.framework == "xgboost":
            self.booster.set_param({"nthread": self.threads})

    def predict(self, inputs, outputs=None):
        x = np.asarray(next(iter(inputs.values())), dtype=np.float32)
        out = predict(self.booster, x, self.info, threads=self.threads)
        wanted = outputs or [o.name for o in self.signature.outputs]
        return {k: v for k, v in out.items() if k in wanted}

    def unload(self) -> None:
        self.booster = None


class XGBoostRuntime(_TreesRuntime):
    """xgboost.Booster.inplace_predict (what XGBClassifier.predict_proba calls)."""

    name = "xgboost"


class LightGBMRuntime(_TreesRuntime):
    """lightgbm.Booster.predict (what LGBMClassifier.predict_proba calls)."""

    name = "lightgbm"
