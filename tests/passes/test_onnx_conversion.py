"""Conversion to ONNX: a graph the checker accepts, with outputs close to the original's."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest

from optiserve.convert.detect import import_file
from optiserve.passes import Artifact, PassSkipped
from tests.builders import linear_onnx, op_counts, run_onnx, save_onnx
from tests.passes.helpers import onnx_artifact, run_pass

pytestmark = pytest.mark.integration


def _imported_artifact(path: Path, **kw) -> Artifact:
    imp = import_file(path, **kw)
    return Artifact(path=path, format=imp.format, signature=imp.signature, meta=imp.meta)


@pytest.fixture
def logreg_artifact(tmp_path, logreg):
    joblib.dump(logreg, tmp_path / "logreg.pkl")
    return _imported_artifact(tmp_path / "logreg.pkl")


def test_already_onnx_is_skipped(tmp_path, settings):
    src = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    with pytest.raises(PassSkipped, match="already ONNX"):
        run_pass("onnx_conversion", onnx_artifact(src), settings, tmp_path / "wd")


def test_sklearn_logreg_float32(tmp_path, settings, logreg, logreg_artifact, breast_cancer):
    out = run_pass("onnx_conversion", logreg_artifact, settings, tmp_path / "wd")
    model = onnx.load(str(out.path))
    onnx.checker.check_model(model)
    assert out.format == "onnx" and out.passes[0]["name"] == "onnx_conversion"
    assert {"LinearClassifier"} <= set(op_counts(model))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    sig = out.signature
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("input", "float32", (-1, 30))]
    assert [t.name for t in sig.outputs] == ["label", "probabilities"]

    X = breast_cancer.X_val
    label, proba = run_onnx(out.path, {"input": X.astype(np.float32)})
    # float32 arithmetic on features up to ~4000: probabilities agree to ~1e-4.
    np.testing.assert_allclose(proba, logreg.predict_proba(X), rtol=0, atol=1e-3)
    assert (label == logreg.predict(X)).mean() >= 0.99


def test_sklearn_logreg_float64_matches_exactly(tmp_path, settings, logreg, logreg_artifact,
                                                breast_cancer):
    out = run_pass("onnx_conversion", logreg_artifact, settings, tmp_path / "wd",
                   {"dtype": "float64"})
    assert out.signature.inputs[0].dtype == "float64"
    label, proba = run_onnx(out.path, {"input": breast_cancer.X_val})
    np.testing.assert_allclose(proba, logreg.predict_proba(breast_cancer.X_val), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_array_equal(label, logreg.predict(breast_cancer.X_val))


def test_sklearn_forest(tmp_path, settings, forest, breast_cancer):
    joblib.dump(forest, tmp_path / "forest.pkl")
    out = run_pass("onnx_conversion", _imported_artifact(tmp_path / "forest.pkl"), settings,
                   tmp_path / "wd", {"opset": 15})
    model = onnx.load(str(out.path))
    onnx.checker.check_model(model)
    assert op_counts(model).get("TreeEnsembleClassifier") == 1
    assert "opset 15" in out.notes[0]
    X = breast_cancer.X_val
    label, proba = run_onnx(out.path, {"input": X.astype(np.float32)})
    # Averages of 50 trees' leaf values in float32; a row near a split threshold may move.
    np.testing.assert_allclose(proba, forest.predict_proba(X), rtol=0, atol=0.05)
    assert (label == forest.predict(X)).mean() >= 0.98


def test_torchscript_module(tmp_path, settings, sqlite_registry, digits_net, digits):
    import torch

    from optiserve.api import register

    v = register("digits", digits_net, registry=sqlite_registry,
                 example_inputs=(torch.from_numpy(digits.X_val[:4]),))
    art = Artifact(path=sqlite_registry.path(v), format=v.format, signature=v.signature)
    out = run_pass("onnx_conversion", art, settings, tmp_path / "wd",
                   sample={"x": digits.X_val[:2]})
    model = onnx.load(str(out.path))
    onnx.checker.check_model(model)
    ops = op_counts(model)
    assert ops.get("Gemm", 0) + ops.get("MatMul", 0) == 2 and "Relu" in ops
    assert out.signature.inputs[0].shape == (-1, 64)  # the batch stays dynamic
    (got,) = run_onnx(out.path, {"x": digits.X_val})
    with torch.no_grad():
        ref = digits_net(torch.from_numpy(digits.X_val)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_exported_program_keeps_dynamic_batch(tmp_path, settings):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net.eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    path = tmp_path / "net.pt2"
    torch.export.save(program, str(path))
    art = _imported_artifact(path)
    name = art.signature.inputs[0].name
    sample = {name: np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    out = run_pass("onnx_conversion", art, settings, tmp_path / "wd", sample=sample)
    assert out.signature.inputs[0].shape == (-1, 4)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (got,) = run_onnx(out.path, {name: x})
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
