"""FP16: half-precision weights, FP32 at the boundary, blocked operators kept in FP32, outputs
close to FP32, the file about half the size, and a result ONNX Runtime runs on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optiserve.core.errors import ConfigError
from optiserve.core.hardware import Hardware
from optiserve.passes import PassContext, PassSkipped, get_pass
from optiserve.runtimes.base import load_runtime
from tests.builders import OPSET, mlp_onnx, op_counts, relu_onnx, run_onnx, save_onnx
from tests.passes.helpers import onnx_artifact, run_pass

CPU_ONLY = Hardware(arch="x86_64", cpu="Test CPU", cores=2, ort_providers=("CPUExecutionProvider",))
WITH_GPU = Hardware(arch="x86_64", cpu="Test CPU", cores=2, gpus=("NVIDIA H100",),
                    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


@pytest.fixture
def mlp_path(tmp_path):
    return save_onnx(mlp_onnx((64, 128, 128, 10)), tmp_path / "mlp.onnx")


def fp16(path, tmp_path, settings, options=None, hardware=CPU_ONLY):
    """Run the pass with a chosen Hardware (the note depends on it)."""
    workdir = tmp_path / "wd"
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample={}, hardware=hardware)
    return get_pass("fp16")().run(onnx_artifact(path), get_pass("fp16").parse_config(options), ctx)


def conv_onnx(seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-GlobalAveragePool-Flatten-Gemm on 3x16x16 images."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=1.0):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["x", "C1", "c1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "C2", "c2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "D", "d"], ["y"], transB=1),
    ]
    inits = [init("C1", 8, 3, 3, 3, scale=1 / np.sqrt(27)), init("c1", 8, scale=0.1),
             init("C2", 16, 8, 3, 3, scale=1 / np.sqrt(72)), init("c2", 16, scale=0.1),
             init("D", 10, 16, scale=0.25), init("d", 10, scale=0.1)]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _types(path) -> dict[str, int]:
    """Element type of every tensor in the graph (after shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _close(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())


def test_mlp_graph_sizes_and_outputs(tmp_path, settings, mlp_path):
    out = fp16(mlp_path, tmp_path, settings)
    model = onnx.load(str(out.path))
    onnx.checker.check_model(model)
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    # keep_io_types: the caller still sends and receives FP32, through Casts at the boundary.
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2
    assert any(n.input[0] == "x" for n in casts) and any(n.output[0] == "y" for n in casts)
    assert op_counts(out.path)["MatMul"] == 3
    assert 0.45 < out.path.stat().st_size / mlp_path.stat().st_size < 0.6
    assert out.meta["precision"] == "fp16" and out.label == "fp16"

    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ref, got = run_onnx(mlp_path, {"x": x})[0], run_onnx(out.path, {"x": x})[0]
    assert got.dtype == np.float32
    assert _close(ref, got) < 1e-2
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_conv_graph_stays_close(tmp_path, settings):
    path = save_onnx(conv_onnx(), tmp_path / "conv.onnx")
    out = fp16(path, tmp_path, settings)
    types = _types(out.path)
    assert types["C1"] == types["C2"] == types["D"] == TensorProto.FLOAT16
    assert types["h1"] == types["g"] == TensorProto.FLOAT16
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    assert _close(run_onnx(path, {"x": x})[0], run_onnx(out.path, {"x": x})[0]) < 1e-2


def test_blocked_op_types_and_nodes_stay_float(tmp_path, settings, mlp_path):
    model = onnx.load(str(mlp_path))
    model.graph.node[0].name = "first_matmul"  # MatMul(x, W0)
    save_onnx(model, mlp_path)
    out = fp16(mlp_path, tmp_path, settings,
               {"op_block_list": ["Relu"], "node_block_list": ["first_matmul"]})
    types = _types(out.path)
    # The converter renames the tensors around a blocked node: look at the nodes themselves.
    blocked = [n for n in onnx.load(str(out.path)).graph.node
               if n.op_type == "Relu" or n.name == "first_matmul"]
    assert len(blocked) == 3
    assert all(types[t] == TensorProto.FLOAT for n in blocked for t in (*n.input, *n.output))
    assert types["W0"] == TensorProto.FLOAT and types["W1"] == TensorProto.FLOAT16
    assert types["m1"] == TensorProto.FLOAT16  # the second MatMul runs in FP16
    assert "kept in FP32: Relu" in out.notes[-1]


def test_default_block_list_keeps_unsafe_ops_float(tmp_path, settings):
    """Max is on the converter's unsafe list: it and its operands stay FP32 by default."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Max", ["m", "B"], ["y"])],
        "max", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B")])
    path = save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                       ir_version=10), tmp_path / "max.onnx")
    out = fp16(path, tmp_path, settings)
    types = _types(out.path)
    assert types["W"] == TensorProto.FLOAT16 and types["B"] == TensorProto.FLOAT
    max_node = next(n for n in onnx.load(str(out.path)).graph.node if n.op_type == "Max")
    assert all(types[t] == TensorProto.FLOAT for t in (*max_node.input, *max_node.output))
    x = rng.standard_normal((4, 8)).astype(np.float32)
    assert _close(run_onnx(path, {"x": x})[0], run_onnx(out.path, {"x": x})[0]) < 1e-2


def test_operator_onnx_runtime_refuses_is_blocked(tmp_path, settings):
    """Range has no float16 in its schema: with an empty block list the pass finds out by
    loading the converted graph, keeps Range in FP32 and says so."""
    rng = np.random.default_rng(0)
    scalar = lambda name, v: numpy_helper.from_array(np.float32(v), name)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
         helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "r"], ["y"])],
        "range", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [scalar("start", 0), scalar("limit", 8), scalar("delta", 1),
         numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")])
    path = save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                       ir_version=10), tmp_path / "range.onnx")
    out = fp16(path, tmp_path, settings, {"op_block_list": []})
    assert "ONNX Runtime cannot run in FP16: Range" in out.notes[-1]
    types = _types(out.path)
    range_node = next(n for n in onnx.load(str(out.path)).graph.node if n.op_type == "Range")
    assert all(types[t] == TensorProto.FLOAT for t in (*range_node.input, *range_node.output))
    x = rng.standard_normal((4, 8)).astype(np.float32)
    assert _close(run_onnx(path, {"x": x})[0], run_onnx(out.path, {"x": x})[0]) < 1e-2


def test_fp16_io_runs_in_the_onnxruntime_runtime(tmp_path, settings, mlp_path):
    """keep_io_types=False: FP16 inputs and outputs; the runtime casts what callers send."""
    out = fp16(mlp_path, tmp_path, settings, {"keep_io_types": False})
    model = onnx.load(str(out.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not [n for n in model.graph.node if n.op_type == "Cast"]
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    with load_runtime(out.path, out.signature, format="onnx", threads=1) as runtime:
        got = runtime.predict({"x": x})["y"]
    assert got.dtype == np.float16
    assert _close(run_onnx(mlp_path, {"x": x})[0], got) < 1e-2


def test_note_says_fp16_is_a_gpu_optimization_on_a_cpu(tmp_path, settings, mlp_path):
    cpu_note = fp16(mlp_path, tmp_path, settings).notes[-1]
    assert "no GPU here" in cpu_note and "GPU/accelerator optimization" in cpu_note
    assert "105 kB -> 52 kB" in cpu_note  # FP32 -> FP16 weights
    gpu_note = fp16(mlp_path, tmp_path, settings, hardware=WITH_GPU).notes[-1]
    assert "GPU" not in gpu_note and gpu_note.startswith("FP16: 6 weights")


def test_machine_note_through_detected_hardware(tmp_path, settings, mlp_path):
    """What the optimizer gets on this machine: the note follows the detected hardware."""
    from optiserve.core.hardware import detect

    out = run_pass("fp16", onnx_artifact(mlp_path), settings, tmp_path / "wd")
    assert ("GPU/accelerator optimization" in out.notes[-1]) == (not detect().cuda)


def test_skips_quantized_and_weightless_graphs(tmp_path, settings, mlp_path):
    from onnxruntime.quantization import quantize_dynamic

    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(mlp_path), str(int8))
    with pytest.raises(PassSkipped, match="already quantized"):
        fp16(int8, tmp_path, settings)
    relu = save_onnx(relu_onnx(), tmp_path / "relu.onnx")
    with pytest.raises(PassSkipped, match="no FP32 weight"):
        fp16(relu, tmp_path, settings)
    half = fp16(mlp_path, tmp_path, settings)
    with pytest.raises(PassSkipped, match="already holds FP16"):
        fp16(half.path, tmp_path / "again", settings)


@pytest.mark.parametrize("options, field", [
    ({"max_finite_val": 70000.0}, "max_finite_val"),
    ({"min_positive_val": 0.0}, "min_positive_val"),
    ({"keep_io": True}, "keep_io"),
])
def test_config_is_validated(options, field):
    with pytest.raises(ConfigError, match=f"Option '{field}' of pass 'fp16'"):
        get_pass("fp16").parse_config(options)
