"""Runtimes by name: the native one per format, unknown names listing the known ones."""

from __future__ import annotations

import numpy as np
import pytest

from optiserve.convert.onnx_io import import_onnx
from optiserve.core.errors import DatasetError, UnknownNameError
from optiserve.runtimes import load_runtime, runtime_for
from tests.builders import linear_onnx, run_onnx, save_onnx


def test_native_runtime_per_format():
    assert [runtime_for(f) for f in ("onnx", "pkl", "torchscript", "pt2")] == \
        ["onnxruntime", "sklearn", "torch", "torch"]
    with pytest.raises(UnknownNameError, match="Unknown artifact format 'h5'"):
        runtime_for("h5")


def test_unknown_runtime_lists_known(tmp_path):
    path = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    with pytest.raises(UnknownNameError) as info:
        load_runtime(path, import_onnx(path).signature, format="onnx", threads=1, name="tensorrt")
    assert "onnxruntime" in str(info.value) and "sklearn" in str(info.value)


def test_onnxruntime_predict_casts_and_checks_inputs(tmp_path):
    path = save_onnx(linear_onnx(), tmp_path / "m.onnx")
    runtime = load_runtime(path, import_onnx(path).signature, format="onnx", threads=1)
    x = np.random.default_rng(0).standard_normal((3, 4))  # float64: cast to the model's float32
    with runtime:
        out = runtime.predict({"x": x})
        np.testing.assert_allclose(out["y"], run_onnx(path, {"x": x.astype(np.float32)})[0])
        with pytest.raises(DatasetError, match="Input 'x' is missing"):
            runtime.predict({"pixels": x})
        meta = runtime.metadata()
    assert meta["runtime"] == "onnxruntime" and meta["threads"] == 1
    assert meta["signature"]["inputs"][0]["name"] == "x"
