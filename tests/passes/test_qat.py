"""Quantization-aware training: a digits CNN fine-tuned with fake quantization comes out as an
ONNX QDQ model with int8 weights, ONNX Runtime fuses it into integer kernels, and held-out
accuracy stays with the FP32 model's. Bad inputs skip the pass with a reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optiserve.core.hardware import Hardware
from optiserve.data.binding import Dataset
from optiserve.demo.models import fit
from optiserve.passes import Artifact, PassContext, PassSkipped, get_pass
from tests.builders import linear_onnx, op_counts, save_onnx
from tests.passes.helpers import onnx_artifact

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
torch = pytest.importorskip("torch")
nn = torch.nn
VNNI = Hardware(arch="x86_64", cpu="test CPU", cores=1, flags=("avx2", "avx512f", "avx512_vnni"))
NO_VNNI = Hardware(arch="x86_64", cpu="test CPU", cores=1, flags=("avx2",))



@pytest.fixture(scope="module")
def digits8() -> SimpleNamespace:
    """scikit-learn digits as 1x8x8 images in [0, 1]; stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target.astype(np.int64), test_size=0.25,
                                              stratify=d.target, random_state=0)
    return SimpleNamespace(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


@pytest.fixture(scope="module")
def cnn(digits8):
    """conv-BN-ReLU-pool, conv-ReLU-pool, 64 -> 32 -> 10: ~97 % on held-out digits."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return _trained(net, digits8, epochs=15)


def _register(obj, workdir: Path, example=None) -> Artifact:
    """Store a torch model the way the registry does (TorchScript, or a torch.export file)."""
    from optiserve.convert.torch import import_torch_object

    workdir.mkdir(parents=True, exist_ok=True)
    imp = import_torch_object(obj, workdir, example_inputs=example)
    return Artifact(path=imp.path, format=imp.format, signature=imp.signature, meta=imp.meta)


@pytest.fixture(scope="module")
def artifacts(cnn, digits8, tmp_path_factory) -> dict[str, Artifact]:
    x = torch.from_numpy(digits8.x_train[:2])
    root = tmp_path_factory.mktemp("qat_models")
    program = torch.export.export(cnn, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return {"torchscript": _register(cnn, root / "ts", (x,)),
            "pt2": _register(program, root / "pt2")}


def _qat(artifact: Artifact, settings, workdir: Path, training, **options) -> Artifact:
    cls = get_pass("qat")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample={}, training=training)
    return cls().run(artifact, cls.parse_config(options), ctx)


def _digits_rows(digits8, labels: bool = True) -> Dataset:
    return Dataset(inputs={"input": digits8.x_train},
                   labels=digits8.y_train if labels else None, description="digits 8x8")


def _ort_optimized_ops(path: Path, workdir: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (level: extended)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(workdir / "ort_optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return op_counts(workdir / "ort_optimized.onnx")


def _predict(path: Path, x: np.ndarray, name: str = "input") -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


@pytest.mark.slow
@pytest.mark.cpu_numerics
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_qat_exports_int8_qdq_that_keeps_accuracy(tmp_path, settings, digits8, cnn, artifacts,
                                                  fmt):
    out = _qat(artifacts[fmt], settings, tmp_path / "wd", _digits_rows(digits8), steps=100)
    assert out.format == "onnx" and out.passes[-1]["name"] == "qat"
    assert [(s.name, s.shape) for s in out.signature.inputs] == [("input", (-1, 1, 8, 8))]
    assert "cross-entropy against the labels, 1347 rows of digits 8x8" in out.notes[-1]
    assert "2 Conv + 2 Gemm of 4 layers quantized" in out.notes[-1]

    # Every Conv/Gemm weight is an int8 initializer behind DequantizeLinear, one scale per
    # output channel; the activations go through QuantizeLinear -> DequantizeLinear.
    model = onnx.load(str(out.path))
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.op_type for n in compute] == ["Conv", "Conv", "Gemm", "Gemm"]
    for node in compute:
        dq = producer[node.input[1]]
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert dq.op_type == "DequantizeLinear" and weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)
        assert producer[node.input[0]].op_type == "DequantizeLinear"
    assert not any(i.dtype == np.float32 and i.ndim > 1 for i in inits.values())
    assert op_counts(model)["QuantizeLinear"] >= 4

    # ONNX Runtime runs every layer with an integer kernel: no float Conv or Gemm is left.
    fused = _ort_optimized_ops(out.path, tmp_path)
    assert fused.get("QLinearConv") == 2 and fused.get("QGemm") == 2
    assert "Conv" not in fused and "Gemm" not in fused

    with torch.no_grad():
        fp32 = cnn(torch.from_numpy(digits8.x_test)).numpy().argmax(1)
    int8 = _predict(out.path, digits8.x_test).argmax(1)
    acc_fp32, acc_int8 = (fp32 == digits8.y_test).mean(), (int8 == digits8.y_test).mean()
    assert acc_fp32 > 0.93
    assert acc_int8 >= acc_fp32 - 0.02
    assert (int8 == fp32).mean() >= 0.97
    assert _predict(out.path, digits8.x_test[:1]).shape == (1, 10)  # dynamic batch


@pytest.mark.cpu_numerics
def test_without_labels_it_distills_and_can_keep_the_output_float(tmp_path, settings, digits8,
                                                                   cnn, artifacts):
    out = _qat(artifacts["pt2"], settings, tmp_path / "wd", _digits_rows(digits8, labels=False),
               steps=60, quantize_output=False)
    assert "MSE against the original model's outputs" in out.notes[-1]
    model = onnx.load(str(out.path))
    last = next(n for n in model.graph.node if "output" in n.output)
    assert last.op_type == "Gemm"  # the logits are not quantized
    with torch.no_grad():
        ref = cnn(torch.from_numpy(digits8.x_test)).numpy()
    got = _predict(out.path, digits8.x_test)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97


@pytest.mark.slow
@pytest.mark.cpu_numerics
@pytest.mark.parametrize("hardware, bits", [(VNNI, 8), (NO_VNNI, 7)], ids=["vnni", "avx2-only"])
def test_weights_are_trained_in_the_range_the_cpu_computes_exactly(tmp_path, settings, digits8,
                                                                   artifacts, hardware, bits):
    """On x86 without VNNI, ONNX Runtime's u8 x s8 kernel adds pairs of products into 16 bits:
    8-bit weights saturate there (the residual CNN below then missed its bound: a mean logit
    error of 0.121 against 0.069), so the weights are trained in 7 bits, the range the CPU
    then computes exactly."""
    cls, wd = get_pass("qat"), tmp_path / "wd"
    wd.mkdir()
    ctx = PassContext(workdir=wd, settings=settings, sample={}, training=_digits_rows(digits8),
                      hardware=hardware)
    out = cls().run(artifacts["torchscript"], cls.parse_config({"steps": 5}), ctx)
    assert f"{bits}-bit weights" in out.notes[-1]
    model = onnx.load(str(out.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [v for v in inits.values() if v.dtype == np.int8 and v.ndim > 1]
    assert len(weights) == 4
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert all(w.min() >= low and w.max() <= high for w in weights)
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) > high // 2  # range is used


def test_max_seconds_stops_training_and_says_so(tmp_path, settings, digits8, artifacts):
    out = _qat(artifacts["torchscript"], settings, tmp_path / "wd", _digits_rows(digits8),
               steps=100_000, max_seconds=0.01)
    assert "stopped by max_seconds=0.01" in out.notes[-1]
    assert op_counts(out.path)["DequantizeLinear"] >= 4



def test_the_runs_time_limit_stops_training_and_says_so(tmp_path, settings, digits8, artifacts):
    import time

    cls = get_pass("qat")
    (tmp_path / "wd").mkdir()
    ctx = PassContext(workdir=tmp_path / "wd", settings=settings, sample={},
                      training=_digits_rows(digits8), deadline=time.monotonic() + 0.01)
    out = cls().run(artifacts["torchscript"], cls.parse_config({"steps": 100_000}), ctx)
    assert "stopped by OPTIMIZATION_MAX_TIME_MINUTES" in out.notes[-1]
    assert op_counts(out.path)["DequantizeLinear"] >= 4  # what was trained is still exported


class ViewByBatch(nn.Module):
    """Flattens with x.reshape(x.size(0), -1): the batch size is read inside the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.reshape(h.size(0), -1))


class SequenceMLP(nn.Module):
    """Linear layers on [batch, tokens, features]: they export as MatMul, not Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).mean(1)


@pytest.mark.cpu_numerics
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_batch_size_read_in_the_graph_stays_dynamic(tmp_path, settings, digits8, fmt):
    torch.manual_seed(0)
    net, x = ViewByBatch().eval(), torch.from_numpy(digits8.x_train[:2])
    obj = net if fmt == "torchscript" else torch.export.export(
        net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    art = _register(obj, tmp_path / "model", (x,))
    rows = Dataset(inputs={"x": digits8.x_train}, labels=None, description="digits")
    out = _qat(art, settings, tmp_path / "wd", rows, steps=10)
    assert "320 of 1347 rows of digits" in out.notes[-1]  # 10 steps x 32 rows: no more read
    with torch.no_grad():
        ref = net(torch.from_numpy(digits8.x_test[:37])).numpy()
    got = _predict(out.path, digits8.x_test[:37], "x")  # not the batch of 2 it was traced with
    assert got.shape == (37, 10)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_linear_on_sequences_gets_int8_matmul_weights(tmp_path, settings):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((64, 5, 8)).astype(np.float32)
    art = _register(SequenceMLP().eval(), tmp_path / "model", (torch.from_numpy(x[:2]),))
    rows = Dataset(inputs={"x": x}, labels=None, description="random sequences")
    out = _qat(art, settings, tmp_path / "wd", rows, steps=10)
    assert "2 MatMul of 2 layers quantized" in out.notes[-1]
    model = onnx.load(str(out.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.op_type == "MatMul"):
        dq = producer[node.input[1]]  # [in, out] int8 weight, one scale per output column
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert inits[dq.input[0]].dtype == np.int8 and axis == 1
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[1],)
    fused = _ort_optimized_ops(out.path, tmp_path)
    assert "MatMul" not in fused and fused.get("MatMulIntegerToFloat", 0) + fused.get(
        "QLinearMatMul", 0) == 2


class BasicBlock(nn.Module):
    """ResNet's: conv-BN-ReLU, conv-BN, plus the input (or its 1x1 projection), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def _trained(net, digits8, *, epochs: int):
    """`net` trained with Adam on the 8x8 digits for `epochs`, in eval mode."""
    return fit(net, digits8.x_train, digits8.y_train, epochs=epochs, lr=3e-3)


@pytest.fixture(scope="module")
def resnet(digits8):
    """Stem, an identity block and a downsampling block, pool, Linear: 6 convs, 2 residual
    Adds, briefly trained on digits 8x8."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 10))
    return _trained(net, digits8, epochs=4)


@pytest.mark.slow
@pytest.mark.cpu_numerics
def test_residual_cnn_loads_in_onnx_runtime_with_integer_convs_and_adds(tmp_path, settings,
                                                                        digits8, resnet):
    # ONNX Runtime fuses DQ -> Add -> Q into QLinearAdd, which takes only rank-0 scales and zero
    # points: the [1]-shaped ones FakeQuantize exports failed the session's creation.
    x = torch.from_numpy(digits8.x_train[:2])
    art = _register(resnet, tmp_path / "model", (x,))
    out = _qat(art, settings, tmp_path / "wd", _digits_rows(digits8, labels=False), steps=40)
    assert "6 Conv + 1 Gemm of 7 layers quantized" in out.notes[-1]

    model = onnx.load(str(out.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    activations = [n for n in qdq if inits.get(n.input[0], np.zeros(0)).dtype != np.int8]
    assert activations and all(inits[n.input[1]].shape == () == inits[n.input[2]].shape
                               for n in activations)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 2
    for node in adds:  # per-tensor Q/DQ on both residual inputs, or none
        for name in node.input:
            dq = producer.get(name)
            assert dq is None or dq.op_type != "DequantizeLinear" or inits[dq.input[1]].ndim == 0
    inputs = Counter(n.input[0] for n in qdq if n.op_type == "QuantizeLinear")
    assert max(inputs.values()) == 1  # the block's conv and its downsample share one

    fused = _ort_optimized_ops(out.path, tmp_path)
    assert fused.get("QLinearConv") == 6 and "Conv" not in fused
    assert fused.get("QLinearAdd", 0) >= 1 and fused.get("QGemm") == 1

    with torch.no_grad():
        ref = resnet(torch.from_numpy(digits8.x_test)).numpy()
    got = _predict(out.path, digits8.x_test)
    acc_fp32, acc_int8 = ((p.argmax(1) == digits8.y_test).mean() for p in (ref, got))
    assert acc_fp32 > 0.9
    assert acc_int8 >= acc_fp32 - 0.02
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()  # distilled: logits stay put


# -- input the pass cannot use ----------------------------------------------------------------
def test_non_torch_artifact_is_skipped(tmp_path, settings, digits8):
    art = onnx_artifact(save_onnx(linear_onnx(), tmp_path / "m.onnx"))
    with pytest.raises(PassSkipped, match="trains PyTorch models; this artifact is onnx"):
        _qat(art, settings, tmp_path / "wd", _digits_rows(digits8))


def test_no_training_data_is_skipped_with_what_to_give(tmp_path, settings, artifacts):
    with pytest.raises(PassSkipped, match="qat needs training data: give training_dataset"):
        _qat(artifacts["torchscript"], settings, tmp_path / "wd", None)


def test_training_data_without_rows_is_skipped(tmp_path, settings, artifacts):
    empty = Dataset(inputs={"input": np.zeros((0, 1, 8, 8), np.float32)}, labels=None,
                    description="an empty file")
    with pytest.raises(PassSkipped, match=r"no rows \(an empty file\)"):
        _qat(artifacts["torchscript"], settings, tmp_path / "wd", empty)


def test_training_rows_of_the_wrong_shape_name_input_and_shapes(tmp_path, settings, artifacts):
    rows = Dataset(inputs={"input": np.zeros((5, 1, 16, 16), np.float32)}, labels=None,
                   description="16x16 images")
    with pytest.raises(PassSkipped, match=r"training input 'input' has shape \[5, 1, 16, 16\]; "
                                          r"the model expects \[-1, 1, 8, 8\]"):
        _qat(artifacts["pt2"], settings, tmp_path / "wd", rows)


def test_cross_entropy_without_labels_is_skipped(tmp_path, settings, digits8, artifacts):
    with pytest.raises(PassSkipped, match="loss cross_entropy needs .* the labels are missing"):
        _qat(artifacts["pt2"], settings, tmp_path / "wd", _digits_rows(digits8, labels=False),
             loss="cross_entropy")


class InputWeight(nn.Module):
    """A Linear whose weight is computed from the input: nothing to quantize ahead of time."""

    def forward(self, x):
        return nn.functional.linear(x, x[:3] * 2)


class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


@pytest.mark.parametrize("module, reason", [
    (InputWeight(), r"layer 'linear' \(linear\) computes its weight from the model's input"),
    (NoLayers(), r"no Conv or Linear layer to fake-quantize; the graph has mul, relu"),
])
def test_model_the_rewrite_cannot_follow_is_skipped(tmp_path, settings, module, reason):
    x = torch.rand(4, 6)
    art = _register(module, tmp_path / "model", (x,))
    rows = Dataset(inputs={"x": np.random.default_rng(0).random((16, 6), np.float32)},
                   labels=None, description="random rows")
    with pytest.raises(PassSkipped, match=reason):
        _qat(art, settings, tmp_path / "wd", rows)
