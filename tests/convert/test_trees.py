"""XGBoost and LightGBM: native files and scikit-learn wrappers in, run natively, ONNX out with
its parity against the native predict reported."""

from __future__ import annotations

import json

import joblib
import numpy as np
import onnx
import pytest

import optiserve
from optiserve.convert.detect import import_file
from optiserve.core.errors import ConversionError, ModelLoadError
from optiserve.runtimes.base import load_runtime
from tests.builders import write_csv

pytestmark = pytest.mark.integration
xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
pytest.importorskip("onnxmltools")

PROBA_ATOL = 1e-4


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    return X[order][:130], y[order][:130], X[order][130:], y[order][130:]


@pytest.fixture(scope="module")
def xgb_clf(breast_cancer):
    return xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1).fit(
        breast_cancer.X_train, breast_cancer.y_train)


@pytest.fixture(scope="module")
def lgb_clf(wine):
    X, y, _, _ = wine
    return lgb.LGBMClassifier(n_estimators=30, num_leaves=8, verbose=-1, n_jobs=1).fit(X, y)


def _native(version, registry, X):
    with load_runtime(registry.path(version), version.signature, format=version.format,
                      threads=1) as rt:
        return rt.predict({"input": X.astype(np.float32)}), rt.metadata()["runtime"]


@pytest.mark.parametrize("suffix,fmt", [(".json", "xgboost"), (".ubj", "xgboost_ubj")])
def test_xgboost_native_file_registers_and_runs_natively(sqlite_registry, tmp_path, xgb_clf,
                                                         breast_cancer, suffix, fmt):
    path = tmp_path / f"m{suffix}"
    xgb_clf.get_booster().save_model(str(path))
    v = optiserve.register("xgb", path, registry=sqlite_registry)
    assert (v.format, v.framework) == (fmt, "xgboost")
    assert [(t.name, t.dtype, t.shape) for t in v.signature.inputs] == [
        ("input", "float32", (-1, 30))]
    assert [(t.name, t.dtype, t.shape) for t in v.signature.outputs] == [
        ("label", "int64", (-1,)), ("probabilities", "float32", (-1, 2))]
    out, runtime = _native(v, sqlite_registry, breast_cancer.X_val)
    assert runtime == "xgboost"
    X32 = breast_cancer.X_val.astype(np.float32)
    np.testing.assert_array_equal(out["label"], xgb_clf.predict(X32))
    np.testing.assert_allclose(out["probabilities"], xgb_clf.predict_proba(X32), atol=1e-7)


def test_lightgbm_native_file_with_feature_names(tmp_path, wine):
    X, y, _, _ = wine
    names = [f"f_{i}" for i in range(X.shape[1])]
    booster = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1,
                         "num_leaves": 8}, lgb.Dataset(X, y, feature_name=names), 20)
    booster.save_model(str(tmp_path / "m.txt"))
    imported = import_file(tmp_path / "m.txt")
    assert (imported.format, imported.framework) == ("lightgbm", "lightgbm")
    assert imported.meta["feature_names"] == names
    assert imported.meta["classes"] == [0, 1, 2]
    assert imported.signature.outputs[1].shape == (-1, 3)


def test_regressor_wrapper_has_a_variable_output(sqlite_registry, breast_cancer):
    reg = lgb.LGBMRegressor(n_estimators=20, verbose=-1).fit(breast_cancer.X_train,
                                                             breast_cancer.y_train * 10.0)
    v = optiserve.register("lgbr", reg, registry=sqlite_registry)
    assert v.format == "lightgbm"
    assert [(t.name, t.shape) for t in v.signature.outputs] == [("variable", (-1, 1))]
    out, _ = _native(v, sqlite_registry, breast_cancer.X_val)
    # the signature's float32 rows, as the data binding feeds them
    expected = reg.predict(breast_cancer.X_val.astype(np.float32))
    np.testing.assert_allclose(out["variable"][:, 0], expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["xgb_clf", "lgb_clf"])
def test_wrapper_converts_end_to_end_with_native_baseline(request, sqlite_registry, tmp_path,
                                                          breast_cancer, wine, model):
    est = request.getfixturevalue(model)
    if model == "xgb_clf":
        X_val, y_val, framework = breast_cancer.X_val, breast_cancer.y_val, "xgboost"
    else:
        _, _, X_val, y_val = wine
        framework = "lightgbm"
    optiserve.register("trees", est, registry=sqlite_registry)
    csv = write_csv(tmp_path / "val.csv", X_val, y_val)
    result = optiserve.optimize(
        "trees", registry=sqlite_registry, optimizations=["onnx_conversion"], iterations=5,
        warmup=1, validation_dataset={"source": "file", "path": str(csv),
                                      "label_column": "target"})
    assert result.status == "completed"
    assert result.original.runtime == framework
    assert result.response["optimized"]["format"] == "onnx"
    (cand,) = result.candidates
    notes = " | ".join(cand.artifact.notes)
    assert "onnxmltools" in notes and "parity: max |Δprobability|" in notes
    assert "parity warning" not in notes

    latest = sqlite_registry.get("trees")
    onnx.checker.check_model(str(sqlite_registry.path(latest)))
    with load_runtime(sqlite_registry.path(latest), latest.signature, format="onnx",
                      threads=1) as rt:
        converted = rt.predict({"input": X_val.astype(np.float32)})
    X32 = X_val.astype(np.float32)
    np.testing.assert_array_equal(converted["label"], est.predict(X32))
    np.testing.assert_allclose(converted["probabilities"], est.predict_proba(X32),
                               rtol=0, atol=PROBA_ATOL)


def test_wrapper_in_a_pickle_is_converted_through_skl2onnx(tmp_path, settings, xgb_clf,
                                                           breast_cancer):
    from optiserve.passes import Artifact
    from tests.passes.helpers import run_pass

    joblib.dump(xgb_clf, tmp_path / "m.pkl")
    imp = import_file(tmp_path / "m.pkl")
    assert imp.format == "pkl"
    art = Artifact(path=imp.path, format=imp.format, signature=imp.signature, meta=imp.meta)
    out = run_pass("onnx_conversion", art, settings, tmp_path / "wd",
                   sample={"input": breast_cancer.X_val[:32]})
    assert out.format == "onnx" and any(n.startswith("parity: ") for n in out.notes)
    with load_runtime(out.path, out.signature, format="onnx", threads=1) as rt:
        got = rt.predict({"input": breast_cancer.X_val.astype(np.float32)})
    np.testing.assert_array_equal(got["label"], xgb_clf.predict(breast_cancer.X_val))


def test_parity_note_warns_above_tolerance():
    from optiserve.convert.trees import parity

    native = {"label": np.array([0, 1]), "probabilities": np.array([[0.9, 0.1], [0.4, 0.6]])}
    same = parity(native, {k: v.copy() for k, v in native.items()})
    assert same.startswith("parity: ") and "0 label disagreement" in same
    off = {"label": np.array([0, 0]), "probabilities": np.array([[0.9, 0.1], [0.5001, 0.4999]])}
    note = parity(native, off)
    assert note.startswith("parity warning: ") and "1 label disagreement" in note


# -- bad input ------------------------------------------------------------------------------
def test_truncated_xgboost_json_names_version_and_resave(tmp_path, xgb_clf):
    xgb_clf.get_booster().save_model(str(tmp_path / "m.json"))
    data = (tmp_path / "m.json").read_bytes()
    (tmp_path / "cut.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        import_file(tmp_path / "cut.json")
    msg = str(err.value)
    assert f"xgboost is {xgb.__version__}" in msg and 'save_model("m.json")' in msg
    assert "\n" not in msg.strip()


def test_xgboost_binary_model_is_refused_with_how_to_resave(tmp_path):
    (tmp_path / "old.model").write_bytes(b"binf" + bytes(64))
    with pytest.raises(ModelLoadError, match=r"binary model.*removed in xgboost 3\.1.*"
                                             r"booster\.save_model"):
        import_file(tmp_path / "old.model")


def test_json_that_is_not_xgboost_is_refused(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"weights": [1, 2]}))
    with pytest.raises(ModelLoadError, match="not an ONNX.*XGBoost or LightGBM"):
        import_file(tmp_path / "m.json")


@pytest.mark.slow
def test_lightgbm_categorical_split_is_named_and_refused(sqlite_registry, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    X[:, 2] = rng.integers(0, 5, 300)
    y = ((X[:, 0] + (X[:, 2] == 3)) > 0.5).astype(int)
    ds = lgb.Dataset(X, y, categorical_feature=[2], feature_name=["a", "b", "color", "d"])
    booster = lgb.train({"objective": "binary", "verbose": -1, "min_data_per_group": 5,
                         "cat_smooth": 1}, ds, 10)
    booster.save_model(str(tmp_path / "cat.txt"))
    optiserve.register("cat", tmp_path / "cat.txt", registry=sqlite_registry)
    from optiserve.convert.trees import to_onnx

    with pytest.raises(ConversionError, match=r"categorical feature\(s\) color.*[Oo]ne-hot.*"
                                              r"native LightGBM runtime"):
        to_onnx(tmp_path / "cat.txt", "lightgbm", 4, opset=17)
    # Through the optimizer: one of optiserve's errors carrying the reason, not a traceback.
    with pytest.raises(optiserve.core.errors.OptiserveError,
                       match=r"onnx_conversion failed.*categorical feature\(s\) color"):
        optiserve.optimize("cat", registry=sqlite_registry, iterations=3, warmup=0,
                           optimizations=["onnx_conversion"])
