"""scikit-learn: pickled or skops-saved estimators and pipelines in, ONNX out (skl2onnx).

A pickle runs code when loaded, so only files the user named on this machine are unpickled. A
skops file (skops.io.dump) is loaded without pickle, and only when every type it holds is one
optiserve trusts (see load_skops): that is the format for models that arrive over a network.

scikit-learn computes in float64; ONNX tree and linear operators default to float32. The
conversion never hides that: parity (max error, label agreement) is measured and reported, and
`dtype: float64` converts with double tensors where the operators allow it.
"""

from __future__ import annotations

import importlib

import json
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.convert.formats import Imported
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
    return _check_estimator(obj, path)


def _check_estimator(obj: Any, path: Path) -> Any:
    if not (hasattr(obj, "predict") and hasattr(obj, "fit")):
        raise ModelLoadError(str(path), f"it holds a {type(obj).__name__}, not a fitted "
                             "scikit-learn estimator or pipeline")
    return obj


# Types skops lists as untrusted that optiserve trusts anyway: those of the libraries a
# scikit-learn model is made of. Anything else (a function or class of the user's own module,
# functools.partial, operator.*, os.*, ...) could run arbitrary code or import arbitrary classes.
_TRUSTED_PACKAGES = ("sklearn", "numpy", "scipy")
# Plain data types only: builtins.* also names functions (eval, exec, getattr, __import__, open).
_TRUSTED_BUILTINS = frozenset({
    "builtins.bytearray", "builtins.bytes", "builtins.complex", "builtins.ellipsis",
    "builtins.frozenset", "builtins.NoneType", "builtins.range", "builtins.slice",
    "collections.Counter", "collections.OrderedDict", "collections.defaultdict",
    "collections.deque"})
# scikit-learn types that skops itself refuses to trust because it can only check an object's
# type, not its content: their node arrays hold raw indices that scikit-learn follows without
# bounds checks, so a crafted file loads fine and then crashes the server (or reads out-of-bounds
# memory) on predict. skops 0.16 lists them in skops.io.exceptions.UNTRUSTED_TYPE_REASONS.
_UNSAFE_SKLEARN_TYPES = {
    "sklearn.tree._tree.Tree": "the node storage of decision trees, random forests, extra "
                               "trees and gradient boosting",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor":
        "the trees of HistGradientBoosting models",
}
_SHOWN_TYPES = 5


def _trusted_type(name: str) -> bool:
    """Only classes are trusted, never functions (skops calls what it loads: a trusted
    function would be code execution): scikit-learn classes, NumPy arrays / dtypes / scalars /
    random generators, SciPy sparse matrices, and plain builtin data types."""
    if name in _TRUSTED_BUILTINS:
        return True
    module, _, attr = name.rpartition(".")
    if module.split(".")[0] not in _TRUSTED_PACKAGES:
        return False
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception:  # not importable: not trusted
        return False
    if not isinstance(obj, type):
        return False
    if module.split(".")[0] == "sklearn":
        return True
    if module.split(".")[0] == "numpy":
        import numpy as np

        return issubclass(obj, (np.dtype, np.generic, np.ndarray, np.random.Generator,
                                np.random.BitGenerator, np.random.RandomState))
    return module.startswith("scipy.sparse")


def _skops_unsafe_types() -> set[str]:
    """The types this skops version documents as unsafe to trust (none before skops 0.16)."""
    try:
        from skops.io.exceptions import UNTRUSTED_TYPE_REASONS
    except ImportError:
        return set()
    return set(UNTRUSTED_TYPE_REASONS)


def _schema_types(path: Path) -> set[str]:
    """Every 'module.Class' named in a skops file's schema.json (read as JSON, nothing imported).

    skops before 0.16 trusts the types it now documents as unsafe by default, so they are not
    in get_untrusted_types; this finds them whatever the skops version.
    """
    with zipfile.ZipFile(path) as z:
        schema = json.loads(z.read("schema.json"))
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module, cls = node.get("__module__"), node.get("__class__")
            if isinstance(module, str) and isinstance(cls, str):
                found.add(f"{module}.{cls}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _some(names: list[str]) -> str:
    more = len(names) - _SHOWN_TYPES
    return ", ".join(names[:_SHOWN_TYPES]) + (f" and {more} more" if more > 0 else "")


def load_skops(path: Path) -> Any:
    """Load an estimator saved with skops.io.dump, refusing any type optiserve does not trust.

    Nothing is imported or constructed before the whole file is audited: the types skops does
    not trust by default are listed first (get_untrusted_types reads only schema.json), and the
    file is refused if one of them is outside scikit-learn, NumPy and SciPy (or plain builtin
    data types), or is one skops documents as unsafe. Then it is loaded with exactly the listed
    types trusted.
    """
    sio = require("skops.io", extra="sklearn", feature="Loading a skops model")
    _sklearn("Loading a skops model")
    corrupted_hint = "Save the estimator again with skops.io.dump; the file may be truncated."
    try:
        listed = sio.get_untrusted_types(file=path)
        present = _schema_types(path)
    except (zipfile.BadZipFile, zlib.error, json.JSONDecodeError, KeyError, ValueError,
            TypeError, AttributeError, EOFError) as exc:
        raise ModelLoadError(str(path), f"the skops file is corrupted ({first_line(exc)})",
                             hint=corrupted_hint) from None
    known_unsafe = set(_UNSAFE_SKLEARN_TYPES) | _skops_unsafe_types()
    foreign = [t for t in listed if t not in known_unsafe and not _trusted_type(t)]
    unsafe = sorted(t for t in present | set(listed) if t in known_unsafe)
    if foreign:
        raise ModelLoadError(
            str(path), f"it holds types outside scikit-learn, NumPy and SciPy: "
            f"{_some(foreign)}; loading them would import arbitrary classes and run arbitrary "
            "code, so optiserve does not trust them",
            hint="Convert the model to ONNX and register the .onnx file, or build it only from "
            "scikit-learn classes (no functions or classes of your own, e.g. in a "
            "FunctionTransformer) and save it again with skops.io.dump.")
    if unsafe:
        what = _UNSAFE_SKLEARN_TYPES.get(unsafe[0], "a type skops documents as unsafe")
        raise ModelLoadError(
            str(path), f"it holds {_some(unsafe)} ({what}), which skops cannot check: a crafted "
            "file loads, then crashes the server or reads out-of-bounds memory on predict",
            hint="Convert the model to ONNX and register the .onnx file, or save it with "
            "joblib and register the .pkl from this machine if you trust it.")
    try:
        obj = sio.load(path, trusted=listed)
    except (zipfile.BadZipFile, zlib.error, json.JSONDecodeError, KeyError, ValueError,
            IndexError, EOFError) as exc:
        raise ModelLoadError(str(path), f"the skops file is corrupted ({first_line(exc)})",
                             hint=corrupted_hint) from None
    except (ImportError, AttributeError, TypeError) as exc:
        raise ModelLoadError(str(path), "the skops file needs code this installation does not "
                             f"have, or is corrupted ({first_line(exc)})",
                             hint="Save it again with the installed scikit-learn and skops "
                             "versions, or convert it to ONNX.") from None
    return _check_estimator(obj, path)


def load_estimator(path: Path, format: str) -> Any:
    """Load a scikit-learn artifact stored as `format` ('pkl' or 'skops')."""
    if format == "skops":
        return load_skops(path)
    if format == "pkl":
        return load_pickle(path)
    raise ModelLoadError(str(path), f"'{format}' is not a scikit-learn format",
                         hint="scikit-learn models are stored as pkl or skops.")


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


def import_skops(path: Path) -> Imported:
    est = load_skops(path)
    return Imported(path=path, format="skops", signature=signature_of(est), meta=_meta(est))


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
    from optiserve.convert.trees import is_tree_wrapper

    if is_tree_wrapper(_final(est)):  # an XGBoost/LightGBM wrapper, e.g. in a pipeline
        from optiserve.convert.trees import (_booster_of, check_convertible,
                                             register_wrapper_converters)

        check_convertible(_booster_of(_final(est)))
        register_wrapper_converters()
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
