"""ORT offline graph optimization on tiny graphs: fewer nodes, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from optiserve.passes import PassSkipped
from tests.builders import linear_onnx, mlp_onnx, op_counts, relu_onnx, run_onnx, save_onnx
from tests.passes.helpers import onnx_artifact, run_pass


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_matmul_add_is_fused_into_gemm(tmp_path, settings, level):
    src = save_onnx(linear_onnx(4, 3), tmp_path / "linear.onnx")
    assert op_counts(src) == {"MatMul": 1, "Add": 1}
    out = run_pass("graph_optimization", onnx_artifact(src), settings, tmp_path / "wd",
                   {"level": level})
    onnx.checker.check_model(str(out.path))
    assert op_counts(out.path) == {"Gemm": 1}
    assert out.notes == [f"ORT {level}: 2 -> 1 nodes"]
    assert out.passes[-1]["name"] == "graph_optimization"
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out.path, {"x": x})[0], run_onnx(src, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_mlp_shrinks_and_keeps_outputs(tmp_path, settings):
    src = save_onnx(mlp_onnx(), tmp_path / "mlp.onnx")
    out = run_pass("graph_optimization", onnx_artifact(src), settings, tmp_path / "wd")
    before, after = op_counts(src), op_counts(out.path)
    assert sum(after.values()) < sum(before.values())
    assert "MatMul" not in after  # every MatMul+Add became a (Fused)Gemm
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out.path, {"x": x})[0], run_onnx(src, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)
    assert out.signature == onnx_artifact(src).signature


def test_nothing_to_optimize_is_skipped(tmp_path, settings):
    src = save_onnx(relu_onnx(), tmp_path / "relu.onnx")
    with pytest.raises(PassSkipped, match="nothing to optimize"):
        run_pass("graph_optimization", onnx_artifact(src), settings, tmp_path / "wd")
