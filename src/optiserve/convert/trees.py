"""XGBoost and LightGBM: native model files and scikit-learn wrappers in, ONNX out (onnxmltools).

Native files keep their own format ("xgboost" JSON, "xgboost_ubj", "lightgbm" text) and run in
the framework's own predict, so the optimizer's baseline is the framework the user trained with.
The ONNX tree operators compute in float32; the conversion measures the difference against the
native predict on real rows and reports it (see parity()).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.convert.formats import Imported
from optiserve.core.deps import require
from optiserve.core.errors import ConversionError, ModelLoadError, first_line
from optiserve.core.types import Signature, TensorSpec

XGBOOST_FORMATS = ("xgboost", "xgboost_ubj")
TREE_FORMATS = (*XGBOOST_FORMATS, "lightgbm")
#: probability (or scaled regression) difference above which the conversion note warns
PARITY_TOLERANCE = 1e-4
_LGB_CLASSIFIERS = ("binary", "multiclass", "multiclassova")


def _xgb(feature: str):
    return require("xgboost", extra="trees", feature=feature)


def _lgb(feature: str):
    return require("lightgbm", extra="trees", feature=feature)


def _resave_hint(xgb) -> str:
    return (f"The installed xgboost is {xgb.__version__}. Load the model with the xgboost "
            "version that wrote it and re-save it as JSON or UBJ: "
            "booster.save_model(\"m.json\").")


def sniff_tree(path: Path) -> str | None:
    """'xgboost', 'xgboost_ubj' or 'lightgbm' when the bytes say so, else None.

    An XGBoost binary file (the format removed in xgboost 3.1) is refused here with what to do.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"{") and b"learner" in head[:64]:
        # JSON: the first key is quoted; UBJ: a length marker (L, i, U, ...) precedes it.
        return "xgboost" if head[1:].lstrip().startswith(b'"') else "xgboost_ubj"
    if head.startswith(b"tree\n") or b"\ntree_sizes=" in head:
        return "lightgbm"
    if head.startswith(b"binf") or path.suffix.lower() in (".model", ".bst", ".deprecated"):
        xgb = _xgb("Loading an XGBoost model")
        raise ModelLoadError(str(path), "it looks like an XGBoost binary model, a format "
                             "removed in xgboost 3.1, or is corrupted",
                             hint=_resave_hint(xgb))
    return None


# -- loading --------------------------------------------------------------------------------
def load_booster(path: Path, format: str) -> Any:
    """The native Booster of an xgboost/xgboost_ubj/lightgbm file; errors say how to re-save."""
    if format in XGBOOST_FORMATS:
        xgb = _xgb("Loading an XGBoost model")
        try:
            booster = xgb.Booster()
            # from bytes: xgboost tells JSON from UBJ by content, whatever the file's name
            booster.load_model(bytearray(Path(path).read_bytes()))
            return booster
        except xgb.core.XGBoostError as exc:
            raise ModelLoadError(str(path), "xgboost cannot read it: it is corrupted or from "
                                 f"an incompatible version ({first_line(exc, 200)})",
                                 hint=_resave_hint(xgb)) from None
    if format == "lightgbm":
        lgb = _lgb("Loading a LightGBM model")
        try:
            return lgb.Booster(model_file=str(path))
        except (lgb.basic.LightGBMError, ValueError, OSError) as exc:
            raise ModelLoadError(str(path), "LightGBM cannot read it: it is corrupted or from "
                                 f"an incompatible version ({first_line(exc, 200)})",
                                 hint=f"The installed lightgbm is {lgb.__version__}. Re-save "
                                 "it with booster.save_model(\"m.txt\").") from None
    raise ModelLoadError(str(path), f"'{format}' is not an XGBoost or LightGBM format",
                         hint=f"Tree formats: {', '.join(TREE_FORMATS)}.")


@dataclass
class TreeInfo:
    """What the optimizer needs to know about a booster."""

    framework: str          # "xgboost" or "lightgbm"
    objective: str
    n_features: int
    n_classes: int          # 0 for a regressor (or any objective without class probabilities)
    feature_names: list[str] | None


def info(booster: Any) -> TreeInfo:
    if type(booster).__module__.startswith("xgboost"):
        learner = json.loads(booster.save_config())["learner"]
        objective = learner["objective"]["name"]
        num_class = int(learner["learner_model_param"].get("num_class", 0) or 0)
        classes = 2 if objective == "binary:logistic" else (
            num_class if objective.startswith("multi:") else 0)
        names = booster.feature_names
        return TreeInfo("xgboost", objective, booster.num_features(), classes,
                        list(names) if names else None)
    header = _lgb_header(booster)
    objective = header.get("objective", "regression").split()[0]
    num_class = int(header.get("num_class", "1"))
    classes = (2 if objective == "binary" else num_class) if objective in _LGB_CLASSIFIERS else 0
    names = booster.feature_name()
    default = [f"Column_{i}" for i in range(len(names))]
    return TreeInfo("lightgbm", objective, booster.num_feature(), classes,
                    None if names == default else list(names))


def _lgb_header(booster: Any) -> dict[str, str]:
    """key=value lines before the first tree of a LightGBM model (objective, num_class)."""
    header: dict[str, str] = {}
    for line in booster.model_to_string(num_iteration=0).splitlines():
        if line.startswith("Tree="):
            break
        key, sep, value = line.partition("=")
        if sep:
            header[key] = value
    return header


def signature_of(ti: TreeInfo) -> Signature:
    inputs = (TensorSpec(name="input", dtype="float32", shape=(-1, ti.n_features)),)
    if ti.n_classes:
        outputs = (TensorSpec(name="label", dtype="int64", shape=(-1,)),
                   TensorSpec(name="probabilities", dtype="float32",
                              shape=(-1, ti.n_classes)))
    else:
        outputs = (TensorSpec(name="variable", dtype="float32", shape=(-1, 1)),)
    return Signature(inputs=inputs, outputs=outputs)


def _meta(ti: TreeInfo, estimator: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"estimator": estimator, "objective": ti.objective}
    if ti.feature_names:
        meta["feature_names"] = ti.feature_names
    if ti.n_classes:
        meta["classes"] = list(range(ti.n_classes))
    return meta


def import_native(path: Path, format: str) -> Imported:
    booster = load_booster(path, format)
    ti = info(booster)
    return Imported(path=path, format=format, signature=signature_of(ti),
                    meta=_meta(ti, f"{ti.framework}.Booster"))


def is_tree_wrapper(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in ("xgboost", "lightgbm")


def import_tree_object(obj: Any, workdir: Path) -> Imported:
    """A Booster or a scikit-learn wrapper (XGBClassifier, LGBMRegressor, ...), saved natively.

    A wrapper whose classes are not 0..n-1 (LightGBM encodes string labels itself) is kept as a
    pickle: the booster file would lose the class names.
    """
    booster = _booster_of(obj)
    classes = getattr(obj, "classes_", None)
    if classes is not None and not np.array_equal(np.asarray(classes), np.arange(len(classes))):
        from optiserve.convert.sklearn import import_estimator

        return import_estimator(obj, workdir)
    if type(booster).__module__.startswith("xgboost"):
        path, fmt = workdir / "model.json", "xgboost"
    else:
        path, fmt = workdir / "model.txt", "lightgbm"
    booster.save_model(str(path))
    ti = info(booster)
    names = getattr(obj, "feature_names_in_", None)
    if names is not None:
        ti.feature_names = [str(n) for n in names]
    return Imported(path=path, format=fmt, signature=signature_of(ti),
                    meta=_meta(ti, type(obj).__name__))


def _booster_of(obj: Any) -> Any:
    if type(obj).__name__ == "Booster":
        return obj
    try:
        return obj.get_booster() if hasattr(obj, "get_booster") else obj.booster_
    except Exception as exc:  # NotFittedError / LightGBMError / AttributeError
        raise ModelLoadError(type(obj).__name__, f"the model is not fitted ({first_line(exc)})",
                             hint="Fit it before registering.") from None


# -- native predict -------------------------------------------------------------------------
def predict(booster: Any, x: np.ndarray, ti: TreeInfo, *, threads: int) -> dict[str, np.ndarray]:
    """The framework's own predict, shaped like the signature (label + probabilities, or
    variable). Labels come from the probabilities exactly as the wrappers' predict does."""
    if ti.framework == "xgboost":
        if ti.objective == "multi:softmax":  # predicts labels: probabilities from margins
            margin = booster.inplace_predict(x, predict_type="margin")
            e = np.exp(margin - margin.max(axis=1, keepdims=True))
            raw = e / e.sum(axis=1, keepdims=True)
        else:
            raw = booster.inplace_predict(x)
    else:
        raw = booster.predict(x, num_threads=threads)
    raw = np.asarray(raw, dtype=np.float32)
    if not ti.n_classes:
        return {"variable": raw.reshape(len(raw), -1)}
    proba = np.stack([1 - raw, raw], axis=1) if raw.ndim == 1 else raw
    return {"label": proba.argmax(axis=1).astype(np.int64), "probabilities": proba}


# -- conversion -----------------------------------------------------------------------------
def categorical_features(booster: Any) -> list[str]:
    """The features a LightGBM model splits on as categories (onnxmltools cannot convert them)."""
    if not type(booster).__module__.startswith("lightgbm"):
        return []
    dump = booster.dump_model()
    names = dump.get("feature_names") or []
    found: set[int] = set()
    stack = [t["tree_structure"] for t in dump.get("tree_info", [])]
    while stack:
        node = stack.pop()
        if "split_feature" in node:
            if node.get("decision_type") == "==":
                found.add(int(node["split_feature"]))
            stack += [node["left_child"], node["right_child"]]
    return [names[i] if i < len(names) else f"Column_{i}" for i in sorted(found)]


def check_convertible(booster: Any) -> None:
    cats = categorical_features(booster)
    if cats:
        raise ConversionError(
            f"The LightGBM model splits on categorical feature(s) {', '.join(cats)}, which the "
            "ONNX converter (onnxmltools) cannot convert.",
            hint="One-hot encode those features and retrain, or keep the model in its native "
            "LightGBM runtime (optimize without onnx_conversion).")


def to_onnx(path: Path, format: str, n_features: int, *, opset: int):
    """Convert a native booster file with onnxmltools; returns (proto, opset used)."""
    onnxmltools = require("onnxmltools", extra="trees", feature="Converting trees to ONNX")
    from onnxmltools.convert.common.data_types import FloatTensorType
    from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

    booster = load_booster(path, format)
    ti = info(booster)
    check_convertible(booster)
    used = min(opset, get_maximum_opset_supported())
    types = [("input", FloatTensorType([None, n_features]))]
    try:
        if ti.framework == "xgboost":
            booster = booster.copy()
            booster.feature_names = None  # the converter reads splits named f0, f1, ...
            proto = onnxmltools.convert_xgboost(booster, initial_types=types, target_opset=used)
        else:
            proto = onnxmltools.convert_lightgbm(booster, initial_types=types, zipmap=False,
                                                 target_opset=used)
    except Exception as exc:  # onnxmltools raises RuntimeError/TypeError/... per objective
        raise ConversionError(
            f"onnxmltools cannot convert this {ti.framework} model (objective "
            f"{ti.objective}): {first_line(exc)}",
            hint=f"Keep the model in its native {ti.framework} runtime (optimize without "
            "onnx_conversion).") from None
    names = ["label", "probabilities"] if ti.n_classes else ["variable"]
    for out, name in zip(list(proto.graph.output), names):
        rename_output(proto, out.name, name)
    return proto, used


def rename_output(proto, old: str, new: str) -> None:
    if old == new:
        return
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in proto.graph.output:
        if out.name == old:
            out.name = new


def register_wrapper_converters() -> None:
    """Teach skl2onnx the XGBoost/LightGBM wrappers (for pickles and pipelines holding them)."""
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (calculate_linear_classifier_output_shapes,
                                                  calculate_linear_regressor_output_shapes)

    options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    for module, convert, prefix in (("xgboost", convert_xgboost, "XGBoost"),
                                    ("lightgbm", convert_lightgbm, "LightGbm")):
        mod = require(module, extra="trees", feature="Converting trees to ONNX")
        for cls_name in ("Classifier", "Regressor"):
            cls = getattr(mod, ("XGB" if module == "xgboost" else "LGBM") + cls_name)
            clf = cls_name == "Classifier"
            update_registered_converter(
                cls, f"{prefix}{cls.__name__}",
                calculate_linear_classifier_output_shapes if clf else
                calculate_linear_regressor_output_shapes, convert,
                options=options if clf else None)


# -- parity ---------------------------------------------------------------------------------
def parity(native: dict[str, np.ndarray], converted: dict[str, np.ndarray]) -> str:
    """One note: the largest per-sample float32 difference and the label disagreements;
    it starts with 'parity warning:' above PARITY_TOLERANCE."""
    rows = len(next(iter(native.values())))
    if "probabilities" in native:
        diff = float(np.abs(native["probabilities"] - converted["probabilities"]).max())
        flips = int((native["label"] != converted["label"]).sum())
        text = (f"max |Δprobability| {diff:.2e}, {flips} label disagreement(s) on {rows} rows")
        bad = diff > PARITY_TOLERANCE or flips > 0
    else:
        ref = native["variable"].astype(np.float64)
        diff = float(np.abs(ref - converted["variable"].reshape(ref.shape)).max())
        scale = max(1.0, float(np.abs(ref).max()))
        text = f"max |Δvalue| {diff:.2e} (scale {scale:.3g}) on {rows} rows"
        bad = diff > PARITY_TOLERANCE * scale
    prefix = "parity warning: " if bad else "parity: "
    return prefix + text + f" vs the native predict (tolerance {PARITY_TOLERANCE:g})"
