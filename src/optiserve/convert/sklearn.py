"""scikit-learn: pickled estimators and pipelines in, ONNX out (skl2onnx).

scikit-learn computes in float64; ONNX tree and linear operators default to float32. The
conversion never hides that: parity (max error, label agreement) is measured and reported, and
`dtype: float64` converts with double tensors where the operators allow it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.convert.detect import Imported
from optiserve.core.deps import require
from optiserve.core.errors import ConversionError, ModelLoadError, first_line
from optiserve.core.types import Signature, TensorSpec


def _sklearn(feature: str):
    return require("sklearn", extra="sklearn", feature=feature)


def load_pickle(path: Path) -> Any:
    """Unpickle an estimator from a path the user named (never from an upload)."""
    _sklearn("Loading a scikit-learn model")
    import joblib

    try:
        obj = joblib.load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(str(path), f"the pickle is corrupted ({exc})",
                             hint="Save the estimator again with joblib.dump or pickle.dump.")
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelLoadError(str(path), f"the pickle needs code that is not importable ({exc})",
                             hint="Install the package that defines the model's classes.")
    if not (hasattr(obj, "predict") and hasattr(obj, "fit")):
        raise ModelLoadError(str(path), f"it holds a {type(obj).__name__}, not a fitted "
                             "scikit-learn estimator or pipeline")
    return obj


def is_classifier(est: Any) -> bool:
    return getattr(est, "_estimator_type", None) == "classifier" or hasattr(est, "classes_")


def signature_of(est: Any) -> Signature:
    n = getattr(est, "n_features_in_", None)
    if n is None:
        raise ModelLoadError(type(est).__name__, "the estimator is not fitted "
                             "(no n_features_in_)", hint="Fit it before registering.")
    inputs = (TensorSpec(name="input", dtype="float64", shape=(-1, int(n))),)
    if is_classifier(est):
        classes = np.asarray(est.classes_)
        label_dtype = "str" if classes.dtype.kind in "OUS" else classes.dtype.name
        outputs = (TensorSpec(name="label", dtype=label_dtype, shape=(-1,)),)
        if hasattr(est, "predict_proba"):
            outputs += (TensorSpec(name="probabilities", dtype="float64",
                                   shape=(-1, len(classes))),)
    else:
        outputs = (TensorSpec(name="variable", dtype="float64", shape=(-1, 1)),)
    return Signature(inputs=inputs, outputs=outputs)


def _meta(est: Any) -> dict:
    meta: dict[str, Any] = {"estimator": type(est).__name__}
    names = getattr(est, "feature_names_in_", None)
    if names is not None:
        meta["feature_names"] = [str(n) for n in names]
    if is_classifier(est):
        meta["classes"] = np.asarray(est.classes_).tolist()
    return meta


def import_pickle(path: Path) -> Imported:
    est = load_pickle(path)
    return Imported(path=path, format="pkl", signature=signature_of(est), meta=_meta(est))


def import_estimator(est: Any, workdir: Path) -> Imported:
    _sklearn("Registering a scikit-learn model")
    import joblib

    path = workdir / "model.pkl"
    joblib.dump(est, path)
    return Imported(path=path, format="pkl", signature=signature_of(est), meta=_meta(est))


def to_onnx(est: Any, n_features: int, *, dtype: str, opset: int):
    """Convert with skl2onnx: one input 'input', outputs 'label' + 'probabilities' (no ZipMap)."""
    skl2onnx = require("skl2onnx", extra="sklearn", feature="Converting scikit-learn to ONNX")
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = DoubleTensorType if dtype == "float64" else FloatTensorType
    options = {id(_final(est)): {"zipmap": False}} if is_classifier(est) else None
    try:
        return skl2onnx.convert_sklearn(
            est, initial_types=[("input", tensor([None, n_features]))], options=options,
            target_opset={"": opset, "ai.onnx.ml": 3 if dtype == "float64" else 1})
    except Exception as exc:  # skl2onnx raises RuntimeError/NameError/... for unsupported parts
        raise ConversionError(
            f"skl2onnx cannot convert {type(est).__name__} with dtype {dtype}: "
            f"{first_line(exc)}",
            hint="Try dtype float32, or replace the unsupported step.") from None


def _final(est: Any) -> Any:
    steps = getattr(est, "steps", None)
    return _final(steps[-1][1]) if steps else est
