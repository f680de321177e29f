"""Dynamic INT8 quantization: the graph holds integer ops and the outputs stay close.

Static INT8 (calibrated) has its own file, test_static_quantization.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from optiserve.core.errors import ConfigError
from optiserve.passes import PassSkipped
from tests.builders import mlp_onnx, op_counts, relu_onnx, run_onnx, save_onnx
from tests.passes.helpers import onnx_artifact, run_pass


@pytest.fixture
def mlp_path(tmp_path):
    return save_onnx(mlp_onnx((64, 128, 128, 10)), tmp_path / "mlp.onnx")


def _scales(path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path))
    return {i.name: tuple(i.dims) for i in model.graph.initializer
            if i.name.startswith("W") and i.name.endswith("_scale")}


@pytest.mark.cpu_numerics
@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_int8_graph_and_outputs(tmp_path, settings, mlp_path, per_channel):
    out = run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd",
                   {"method": "dynamic", "per_channel": per_channel})
    onnx.checker.check_model(str(out.path))
    ops = op_counts(out.path)
    assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] == 3
    assert "MatMul" not in ops  # every float MatMul was replaced
    # Per-channel: one weight scale per output column; per-tensor: one scalar per weight.
    expected = {(128,), (10,)} if per_channel else {()}
    assert set(_scales(out.path).values()) == expected
    weights = {i.name: i.data_type for i in onnx.load(str(out.path)).graph.initializer
               if i.name.endswith("_quantized")}
    assert weights and set(weights.values()) == {onnx.TensorProto.INT8}
    assert out.path.stat().st_size < 0.4 * mlp_path.stat().st_size  # int8 weights: ~4x smaller
    assert out.passes[-1]["set"] == {"method": "dynamic", "per_channel": per_channel}
    assert ("per-channel" if per_channel else "per-tensor") in out.notes[0]

    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ref = run_onnx(mlp_path, {"x": x})[0]
    got = run_onnx(out.path, {"x": x})[0]
    scale = np.abs(ref).max()
    # INT8 weights and activations: errors of a few percent of the output range at most.
    assert np.abs(got - ref).max() < 0.05 * scale
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_method_and_per_channel_must_be_set_when_run_directly(tmp_path, settings, mlp_path):
    with pytest.raises(ConfigError, match="method, per_channel must be set"):
        run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd")
    with pytest.raises(ConfigError, match="^per_channel must be set"):
        run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd",
                 {"method": "dynamic"})


def test_excluded_node_stays_float(tmp_path, settings, mlp_path):
    model = onnx.load(str(mlp_path))
    assert model.graph.node[0].op_type == "MatMul"
    model.graph.node[0].name = "first_matmul"
    onnx.save(model, str(mlp_path))
    out = run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd",
                   {"method": "dynamic", "per_channel": False,
                    "nodes_to_exclude": ["first_matmul"]})
    ops = op_counts(out.path)
    assert ops["MatMul"] == 1 and ops["MatMulInteger"] == 2
    assert "left in FP32: MatMul x1 (excluded by you)" in out.notes


def test_excluded_op_type_stays_float(tmp_path, settings, mlp_path):
    out = run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd",
                   {"method": "dynamic", "per_channel": False, "op_types_to_exclude": ["MatMul"],
                    "op_types": ["MatMul", "Gather"]})
    assert op_counts(out.path)["MatMul"] == 3 and "MatMulInteger" not in op_counts(out.path)
    assert "left in FP32: MatMul x3 (excluded by you)" in out.notes
    with pytest.raises(ConfigError, match="leaves none of op_types"):
        run_pass("quantization", onnx_artifact(mlp_path), settings, tmp_path / "wd",
                 {"method": "dynamic", "per_channel": False, "op_types": ["MatMul"],
                  "op_types_to_exclude": ["MatMul"]})


def test_graph_without_matmul_is_skipped(tmp_path, settings):
    src = save_onnx(relu_onnx(), tmp_path / "relu.onnx")
    with pytest.raises(PassSkipped, match="no operator INT8 can speed up"):
        run_pass("quantization", onnx_artifact(src), settings, tmp_path / "wd",
                 {"method": "dynamic", "per_channel": False})


@pytest.mark.integration
def test_tree_ensemble_is_skipped(tmp_path, settings, forest):
    from skl2onnx import to_onnx

    path = tmp_path / "forest.onnx"
    proto = to_onnx(forest, np.zeros((1, 30), np.float32), target_opset={"": 17, "ai.onnx.ml": 1},
                    options={id(forest): {"zipmap": False}})
    proto.ir_version = min(proto.ir_version, 10)
    save_onnx(proto, path)
    with pytest.raises(PassSkipped, match="TreeEnsembleClassifier"):
        run_pass("quantization", onnx_artifact(path), settings, tmp_path / "wd",
                 {"method": "dynamic", "per_channel": True})
