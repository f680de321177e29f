"""scikit-learn models saved with skops: loaded without pickle, only when every type is trusted."""

from __future__ import annotations

import io
import json
import zipfile

import joblib
import numpy as np
import pytest

from optiserve.api import optimize, register
from optiserve.convert.detect import import_file, sniff
from optiserve.convert.sklearn import load_estimator
from optiserve.core.errors import MissingExtraError, ModelLoadError
from optiserve.runtimes.base import load_runtime
from tests.builders import files_under, write_csv

sio = pytest.importorskip("skops.io")

pytestmark = pytest.mark.integration


def _double(x):
    """A function of the user's own: skops must not import it from a file that arrives."""
    return 2 * x


class MeanClassifier:
    """An estimator class of the user's own module, fitted (n_features_in_) like a real one."""

    def fit(self, X, y):
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.full(len(X), self.classes_[0])


def _dump(obj, path):
    sio.dump(obj, path)
    return path


def test_skops_file_registers_and_runs_like_the_estimator(sqlite_registry, logreg, breast_cancer,
                                                          tmp_path):
    path = _dump(logreg, tmp_path / "bc.skops")
    assert sniff(path) == "skops"
    v = register("bc", path, registry=sqlite_registry)
    assert (v.format, v.framework, v.version) == ("skops", "sklearn", 1)
    stored = sqlite_registry.path(v)
    assert stored.suffix == ".skops"
    label, proba = v.signature.outputs
    assert (label.name, label.dtype) == ("label", "int64")
    assert (proba.name, proba.shape) == ("probabilities", (-1, 2))
    assert v.meta["estimator"] == "LogisticRegression" and v.meta["classes"] == [0, 1]

    runtime = load_runtime(stored, v.signature, format=v.format, threads=1)
    with runtime:
        out = runtime.predict({"input": breast_cancer.X_val})
    assert runtime.metadata()["runtime"] == "sklearn"
    assert runtime.metadata()["format"] == "skops"
    np.testing.assert_array_equal(out["label"], logreg.predict(breast_cancer.X_val))
    np.testing.assert_allclose(out["probabilities"], logreg.predict_proba(breast_cancer.X_val),
                               rtol=0, atol=0)


def test_pipeline_signature_and_builtin_data_types(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    # skops lists builtins.frozenset as untrusted; a plain data type is trusted.
    pipe.tags_ = frozenset({"iris"})
    path = _dump(pipe, tmp_path / "iris.skops")
    assert "builtins.frozenset" in sio.get_untrusted_types(file=path)
    imported = import_file(path)
    assert imported.format == "skops" and imported.framework == "sklearn"
    (x,) = imported.signature.inputs
    assert (x.name, x.dtype, x.shape) == ("input", "float64", (-1, 4))
    assert imported.signature.outputs[1].shape == (-1, 3)
    assert imported.meta["estimator"] == "Pipeline"
    loaded = load_estimator(path, "skops")
    np.testing.assert_array_equal(loaded.predict_proba(X), pipe.predict_proba(X))


@pytest.mark.slow
def test_optimize_converts_a_skops_model_to_onnx(sqlite_registry, logreg, breast_cancer,
                                                 tmp_path):
    register("bc", _dump(logreg, tmp_path / "bc.skops"), registry=sqlite_registry)
    csv_path = write_csv(tmp_path / "val.csv", breast_cancer.X_val, breast_cancer.y_val)
    result = optimize(
        "bc", registry=sqlite_registry, optimizations=["onnx_conversion"], iterations=5,
        warmup=1, validation_dataset={"source": "file", "path": str(csv_path),
                                      "label_column": "target"})
    response = result.response
    assert response["status"] == "completed"
    assert response["original"]["format"] == "skops" and response["optimized"]["format"] == "onnx"
    expected_acc = float((logreg.predict(breast_cancer.X_val) == breast_cancer.y_val).mean())
    assert response["original"]["accuracy"] == round(expected_acc, 4)
    latest = sqlite_registry.get("bc")
    assert (latest.version, latest.parent, latest.format) == (2, 1, "onnx")
    assert [p["name"] for p in latest.passes] == ["onnx_conversion"]


def test_function_of_the_users_module_is_refused(sqlite_registry, breast_cancer, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    pipe = make_pipeline(FunctionTransformer(func=_double),
                         LogisticRegression(solver="liblinear")).fit(breast_cancer.X_train,
                                                                     breast_cancer.y_train)
    path = _dump(pipe, tmp_path / "pipe.skops")
    with pytest.raises(ModelLoadError) as info:
        register("pipe", path, registry=sqlite_registry)
    msg = str(info.value)
    assert f"{__name__}._double" in msg
    assert "arbitrary code" in msg and "ONNX" in msg
    assert sqlite_registry.models() == []
    assert files_under(sqlite_registry.store.root) == []


def test_estimator_class_of_the_users_module_is_refused(breast_cancer, tmp_path):
    est = MeanClassifier().fit(breast_cancer.X_train, breast_cancer.y_train)
    path = _dump(est, tmp_path / "mean.skops")
    with pytest.raises(ModelLoadError, match=f"{__name__}.MeanClassifier"):
        import_file(path)


def test_builtin_function_is_refused(logreg, tmp_path):
    from sklearn.base import clone

    est = clone(logreg)
    est.__dict__.update(logreg.__dict__)
    est.hook_ = len  # builtins.* names functions too (eval, exec, getattr): only data is trusted
    with pytest.raises(ModelLoadError, match="builtins.len"):
        import_file(_dump(est, tmp_path / "hook.skops"))


@pytest.mark.parametrize("fixture", ["forest", "hist_gb"])
def test_tree_models_are_refused_as_skops_documents(request, tmp_path, fixture, breast_cancer):
    if fixture == "hist_gb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        est = HistGradientBoostingClassifier(max_iter=3).fit(breast_cancer.X_train,
                                                            breast_cancer.y_train)
        unsafe = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
    else:
        est = request.getfixturevalue(fixture)
        unsafe = "sklearn.tree._tree.Tree"
    with pytest.raises(ModelLoadError) as info:
        import_file(_dump(est, tmp_path / "trees.skops"))
    msg = str(info.value)
    assert unsafe in msg and "out-of-bounds" in msg and "ONNX" in msg


def test_truncated_skops_is_corrupted(logreg, tmp_path):
    data = sio.dumps(logreg)
    path = tmp_path / "half.skops"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="the skops file is corrupted") as info:
        import_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("schema", [b"{not json", b'["a list"]', b'{"protocol": 2}'])
def test_tampered_schema_is_corrupted(logreg, tmp_path, schema):
    src = zipfile.ZipFile(io.BytesIO(sio.dumps(logreg)))
    path = tmp_path / "tampered.skops"
    with zipfile.ZipFile(path, "w") as z:
        for name in src.namelist():
            z.writestr(name, schema if name == "schema.json" else src.read(name))
    with pytest.raises(ModelLoadError, match="the skops file is corrupted"):
        import_file(path)


def test_bad_crc_inside_skops_is_corrupted(logreg, tmp_path):
    data = bytearray(sio.dumps(logreg))
    # Flip one byte of schema.json's stored (uncompressed) content: the zip's CRC check fails.
    start = data.index(b'"__class__"')
    data[start + 2] ^= 0x01
    path = tmp_path / "flipped.skops"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="the skops file is corrupted"):
        import_file(path)


def test_pickle_named_skops_is_refused(logreg, tmp_path):
    path = tmp_path / "model.skops"
    joblib.dump(logreg, path)
    with pytest.raises(ModelLoadError, match="extension says skops but its contents are pkl"):
        import_file(path)


def test_skops_named_pkl_is_refused(logreg, tmp_path):
    path = _dump(logreg, tmp_path / "model.pkl")
    with pytest.raises(ModelLoadError, match="extension says pkl but its contents are skops"):
        import_file(path)


def test_skops_that_is_not_an_estimator(tmp_path):
    path = _dump({"weights": np.arange(3)}, tmp_path / "dict.skops")
    with pytest.raises(ModelLoadError, match="holds a dict, not a fitted"):
        import_file(path)


def test_load_estimator_dispatches_on_format(logreg, tmp_path):
    joblib.dump(logreg, tmp_path / "m.pkl")
    _dump(logreg, tmp_path / "m.skops")
    for fmt in ("pkl", "skops"):
        est = load_estimator(tmp_path / f"m.{fmt}", fmt)
        np.testing.assert_array_equal(est.coef_, logreg.coef_)
    with pytest.raises(ModelLoadError, match="not a scikit-learn format"):
        load_estimator(tmp_path / "m.pkl", "onnx")


def test_missing_skops_names_the_extra(logreg, tmp_path, monkeypatch):
    import sys

    path = _dump(logreg, tmp_path / "m.skops")
    monkeypatch.setitem(sys.modules, "skops.io", None)  # import skops.io now fails
    with pytest.raises(MissingExtraError, match=r"optiserve\[sklearn\]"):
        import_file(path)


def test_schema_json_check_runs_before_torch_checks(tmp_path):
    # A zip with schema.json at its root is a skops file, whatever else it holds.
    path = tmp_path / "odd.skops"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/constants.pkl", b"")
        z.writestr("schema.json", json.dumps({"protocol": 2}))
    assert sniff(path) == "skops"


@pytest.mark.parametrize("name, trusted", [
    ("sklearn.linear_model._logistic.LogisticRegression", True),
    ("numpy.dtype", True),
    ("numpy.float64", True),
    ("numpy.testing._private.utils.runstring", False),  # a function: skops would call it
    ("numpy.load", False),
    ("scipy.io.loadmat", False),
    ("sklearn.utils.deprecated", True),  # a class in sklearn; harmless to construct
    ("os.system", False),
])
def test_only_classes_of_the_trusted_packages_are_trusted(name, trusted):
    from optiserve.convert.sklearn import _trusted_type

    assert _trusted_type(name) is trusted
