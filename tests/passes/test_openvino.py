"""The openvino pass and runtime: IR conversion, INT8 with calibration, and the branching rule
(OpenVINO reads only standard FP32 ONNX; its candidates are leaves of the tree)."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest

import optiserve
from optiserve.data.binding import Dataset
from optiserve.passes.base import Artifact, PassContext, PassSkipped, get_pass
from optiserve.runtimes.base import load_runtime
from tests.builders import mlp_onnx, run_onnx, save_onnx

pytest.importorskip("openvino")
pytestmark = pytest.mark.integration


@pytest.fixture
def mlp(tmp_path):
    path = save_onnx(mlp_onnx(), tmp_path / "mlp.onnx")
    from optiserve.convert.onnx_io import signature_of

    sig = signature_of(onnx.load(str(path)))
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    return Artifact(path=path, format="onnx", signature=sig), x


def _run(artifact, config, tmp_path, settings, x):
    cls = get_pass("openvino")
    ctx = PassContext(workdir=tmp_path / "wd", settings=settings, sample={"x": x[:2]},
                      calibration=Dataset({"x": x}, None, "test rows"))
    (tmp_path / "wd").mkdir(exist_ok=True)
    return cls().run(artifact, cls.parse_config(config), ctx)


def _predict(artifact: Artifact, x: np.ndarray) -> np.ndarray:
    with load_runtime(artifact.path, artifact.signature, format=artifact.format,
                      threads=1) as rt:
        return next(iter(rt.predict({"x": x}).values()))


def test_fp32_ir_matches_onnx_runtime(mlp, tmp_path, settings):
    art, x = mlp
    out = _run(art, {"int8": "none"}, tmp_path, settings, x)
    assert out.format == "openvino" and out.passes[-1]["set"] == {"int8": "none"}
    with zipfile.ZipFile(out.path) as z:
        assert sorted(z.namelist()) == ["model.bin", "model.xml"]
    expected = run_onnx(art.path, {"x": x})[0]
    np.testing.assert_allclose(_predict(out, x), expected, rtol=1e-3, atol=1e-4)


def test_static_int8_stays_close_and_says_how_it_was_calibrated(mlp, tmp_path, settings):
    art, x = mlp
    out = _run(art, {"int8": "static", "calibration_rows": 32}, tmp_path, settings, x)
    got, expected = _predict(out, x), run_onnx(art.path, {"x": x})[0]
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.mean() > 0.99 and cos.min() > 0.95  # INT8 activations on a random MLP
    assert "calibrated on 32 rows of test rows" in out.notes[-1]


def test_ort_specific_graphs_are_skipped_with_the_reason(mlp, tmp_path, settings):
    art, x = mlp
    quantized = get_pass("quantization")().run(
        art, get_pass("quantization").parse_config({"method": "dynamic", "per_channel": True}),
        PassContext(workdir=tmp_path, settings=settings, sample={"x": x[:2]}))
    with pytest.raises(PassSkipped, match="MatMulInteger"):
        _run(quantized, {"int8": "none"}, tmp_path, settings, x)
    with pytest.raises(PassSkipped, match="reads ONNX, not pkl"):
        _run(Artifact(path=art.path, format="pkl", signature=art.signature), {"int8": "none"},
             tmp_path, settings, x)


@pytest.mark.slow
def test_openvino_branches_beside_onnx_runtime_candidates(sqlite_registry):
    optiserve.register("mlp", mlp_onnx(), registry=sqlite_registry)
    result = optiserve.optimize("mlp", registry=sqlite_registry,
                                optimizations=["quantization", "openvino"],
                                quantization_config={"method": "dynamic"},
                                accuracy_threshold=0.9, iterations=10, warmup=1)
    labels = [c.artifact.label for c in result.candidates]
    assert labels == ["quantization(method=dynamic, per_channel=False)",
                      "quantization(method=dynamic, per_channel=True)",
                      "openvino(int8=none)", "openvino(int8=static)"]
    runtimes = {c.artifact.label: c.runtime for c in result.candidates}
    assert runtimes["openvino(int8=none)"] == "openvino"
    # the quantized graphs were not offered to OpenVINO, and nobody is told about it
    assert not [n for n in result.notes if n.startswith("openvino skipped")]
    chosen = result.version
    assert chosen.framework == FRAMEWORK[chosen.format]
    assert all(c.peak_rss_mb > 0 for c in result.candidates)


FRAMEWORK = {"onnx": "onnx", "openvino": "openvino"}


def test_static_int8_without_calibration_rows_is_skipped_with_the_fix(mlp, tmp_path, settings):
    art, x = mlp
    cls = get_pass("openvino")
    (tmp_path / "wd").mkdir()
    for rows in (None, Dataset({"x": x[:0]}, None, "no rows")):
        ctx = PassContext(workdir=tmp_path / "wd", settings=settings, sample={"x": x[:2]},
                          calibration=rows)
        with pytest.raises(PassSkipped, match="needs calibration rows: give calibration_dataset"):
            cls().run(art, cls.parse_config({"int8": "static"}), ctx)
