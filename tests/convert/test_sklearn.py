"""scikit-learn estimators: pickles and objects in, signature from the fitted estimator."""

from __future__ import annotations

import joblib
import numpy as np
import pytest

from optiserve.api import register
from optiserve.convert.detect import import_file
from optiserve.core.errors import ModelLoadError
from optiserve.runtimes.base import load_runtime

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fixture", ["logreg", "forest"])
def test_pickle_signature(request, tmp_path, fixture):
    est = request.getfixturevalue(fixture)
    path = tmp_path / "model.joblib"
    joblib.dump(est, path)
    imported = import_file(path)
    assert imported.format == "pkl" and imported.framework == "sklearn"
    (x,) = imported.signature.inputs
    assert (x.name, x.dtype, x.shape) == ("input", "float64", (-1, 30))
    label, proba = imported.signature.outputs
    assert (label.name, label.dtype, label.shape) == ("label", "int64", (-1,))
    assert (proba.name, proba.dtype, proba.shape) == ("probabilities", "float64", (-1, 2))
    assert imported.meta["estimator"] == type(est).__name__
    assert imported.meta["classes"] == [0, 1]


def test_register_estimator_object_and_run_it(sqlite_registry, logreg, breast_cancer):
    v = register("bc", logreg, registry=sqlite_registry)
    assert (v.format, v.framework, v.version) == ("pkl", "sklearn", 1)
    runtime = load_runtime(sqlite_registry.path(v), v.signature, format=v.format, threads=1)
    with runtime:
        out = runtime.predict({"input": breast_cancer.X_val})
    np.testing.assert_array_equal(out["label"], logreg.predict(breast_cancer.X_val))
    np.testing.assert_allclose(out["probabilities"], logreg.predict_proba(breast_cancer.X_val),
                               rtol=0, atol=0)
    assert runtime.metadata()["runtime"] == "sklearn"


def test_feature_names_and_string_classes_are_recorded(tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    X = np.array([[20.0, 1], [30, 0], [40, 3], [50, 2]])
    est = DecisionTreeClassifier(random_state=0).fit(X, ["stay", "stay", "churn", "churn"])
    # What fitting on a DataFrame records (pandas is not a test dependency).
    est.feature_names_in_ = np.array(["age", "calls"], dtype=object)
    joblib.dump(est, tmp_path / "tree.pkl")
    imported = import_file(tmp_path / "tree.pkl")
    assert imported.meta["feature_names"] == ["age", "calls"]
    assert imported.signature.outputs[0].dtype == "str"
    assert imported.meta["classes"] == ["churn", "stay"]


def test_regressor_has_a_variable_output(tmp_path, breast_cancer):
    from sklearn.linear_model import Ridge

    joblib.dump(Ridge().fit(breast_cancer.X_train, breast_cancer.y_train), tmp_path / "r.pkl")
    (out,) = import_file(tmp_path / "r.pkl").signature.outputs
    assert (out.name, out.dtype, out.shape) == ("variable", "float64", (-1, 1))


def test_unfitted_estimator_is_refused(sqlite_registry):
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(ModelLoadError, match="not fitted"):
        register("unfitted", LogisticRegression(), registry=sqlite_registry)
    assert sqlite_registry.models() == []
