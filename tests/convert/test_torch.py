"""PyTorch: nn.Module (traced), TorchScript files (need input specs), torch.export programs."""

from __future__ import annotations

import numpy as np
import pytest

from optiserve.api import register
from optiserve.convert.detect import import_file, sniff
from optiserve.convert.torch import parse_input_spec
from optiserve.core.types import Signature, TensorSpec, example_inputs
from optiserve.core.errors import ConfigError, ModelLoadError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.integration


class TinyNet(torch.nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.drop = torch.nn.Dropout(dropout)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class NetWithFitPredict(TinyNet):
    """A module with sklearn-like convenience methods, as many training scripts have."""

    def fit(self, X, y):
        return self

    def predict(self, X):
        return self(X).argmax(-1)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def torchscript_file(tmp_path, net):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 4)), str(path))
    return path


def _export(net):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))


def test_parse_input_spec():
    spec = parse_input_spec(" ids : int64[-1, 128] ")
    assert (spec.name, spec.dtype, spec.shape) == ("ids", "int64", (-1, 128))
    with pytest.raises(ConfigError, match="NAME:DTYPE"):
        parse_input_spec("ids[-1]")
    with pytest.raises(ConfigError, match="Unknown dtype"):
        parse_input_spec("x:floaty[-1,4]")


def test_example_inputs_follow_the_signature():
    specs = (parse_input_spec("ids:int64[-1,-1]"), parse_input_spec("x:float32[-1,3]"),
             TensorSpec(name="text", dtype="str", shape=(-1, 1)))
    arrays = example_inputs(specs, rows=5)
    assert arrays["ids"].shape == (5, 8) and arrays["ids"].dtype == np.int64
    assert (arrays["ids"] == 1).all()
    assert arrays["x"].shape == (5, 3) and arrays["x"].dtype == np.float32
    assert arrays["text"].shape == (5, 1) and (arrays["text"] == "").all()
    # the same inputs warm up a served version and stand in for data elsewhere
    sig = Signature(inputs=specs, outputs=())
    assert all((sig.example_inputs(5)[k] == v).all() for k, v in arrays.items())


@pytest.mark.slow
def test_torchscript_file_without_inputs_is_a_config_error(torchscript_file, sqlite_registry):
    assert sniff(torchscript_file) == "torchscript"
    with pytest.raises(ConfigError, match="does not record its input shapes"):
        import_file(torchscript_file)
    with pytest.raises(ConfigError):
        register("ts", torchscript_file, registry=sqlite_registry)
    assert sqlite_registry.models() == []


def test_torchscript_file_with_input_spec(torchscript_file, sqlite_registry):
    v = register("ts", torchscript_file, registry=sqlite_registry, inputs=["x:float32[-1,4]"])
    assert (v.format, v.framework) == ("torchscript", "torch")
    (x,), (out,) = v.signature.inputs, v.signature.outputs
    assert (x.name, x.dtype, x.shape) == ("x", "float32", (-1, 4))
    assert (out.name, out.dtype, out.shape) == ("output", "float32", (-1, 3))
    assert sqlite_registry.path(v).read_bytes() == torchscript_file.read_bytes()


def test_torchscript_with_wrong_input_spec_is_a_model_load_error(torchscript_file):
    with pytest.raises(ModelLoadError, match="fails on inputs of the declared shapes"):
        import_file(torchscript_file, input_specs=["x:float32[-1,7]"])


def test_nn_module_is_traced_to_torchscript(net, sqlite_registry):
    x = torch.randn(6, 4)
    v = register("net", net, registry=sqlite_registry, example_inputs=(x[:2],))
    assert (v.format, v.framework) == ("torchscript", "torch")
    assert v.signature.inputs[0].name == "x"  # from forward()'s parameter name
    assert v.signature.inputs[0].shape == (-1, 4)
    loaded = torch.jit.load(str(sqlite_registry.path(v)))
    torch.testing.assert_close(loaded(x), net(x))


def test_nn_module_without_example_inputs_is_a_config_error(net, sqlite_registry):
    with pytest.raises(ConfigError, match="needs example_inputs"):
        register("net", net, registry=sqlite_registry)


def test_module_in_train_mode_is_registered_in_eval_mode(sqlite_registry):
    torch.manual_seed(0)
    net = TinyNet(dropout=0.5).train()
    v = register("drop", net, registry=sqlite_registry, example_inputs=(torch.randn(2, 4),))
    loaded = torch.jit.load(str(sqlite_registry.path(v)))
    x = torch.randn(32, 4)
    first, second = loaded(x), loaded(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout at inference
    expected = net.fc2(torch.relu(net.fc1(x)))  # the same layers without dropout
    torch.testing.assert_close(first, expected)


def test_module_with_fit_and_predict_methods_is_still_torch(sqlite_registry):
    torch.manual_seed(0)
    v = register("fp", NetWithFitPredict().eval(), registry=sqlite_registry,
                 example_inputs=(torch.randn(2, 4),))
    assert v.format == "torchscript"


@pytest.mark.slow
def test_exported_program_object(net, sqlite_registry):
    v = register("ep", _export(net), registry=sqlite_registry)
    assert (v.format, v.framework) == ("pt2", "torch")
    (x,), (out,) = v.signature.inputs, v.signature.outputs
    assert (x.name, x.dtype, x.shape) == ("x", "float32", (-1, 4))
    assert (out.dtype, out.shape) == ("float32", (-1, 3))
    program = torch.export.load(str(sqlite_registry.path(v)))
    sample = torch.randn(5, 4)
    torch.testing.assert_close(program.module()(sample), net(sample))


@pytest.mark.slow
def test_saved_pt2_file(net, sqlite_registry, tmp_path):
    path = tmp_path / "net.pt2"
    torch.export.save(_export(net), str(path))
    assert sniff(path) == "pt2"
    v = register("pt2file", path, registry=sqlite_registry)
    assert v.format == "pt2" and v.signature.inputs[0].shape == (-1, 4)
    assert sqlite_registry.path(v).suffix == ".pt2"


def test_static_export_keeps_static_batch(net, tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), str(path))
    assert import_file(path).signature.inputs[0].shape == (2, 4)


@pytest.mark.slow
def test_a_program_converted_by_dynamo_quantizes_dynamically(sqlite_registry):
    """The dynamo exporter's shapes for weights made ONNX Runtime's dynamic quantizer fail
    after it transposes a Gemm weight; without them every dynamic INT8 candidate is made."""
    import optiserve

    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10)).eval()
    program = torch.export.export(net, (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    register("p", program, registry=sqlite_registry)
    result = optiserve.optimize("p", registry=sqlite_registry, accuracy_threshold=0.5,
                                optimizations=["onnx_conversion", "quantization"],
                                quantization_config={"method": "dynamic"}, iterations=5,
                                warmup=1)
    assert [c.artifact.label for c in result.candidates] == [
        "onnx_conversion", "onnx_conversion > quantization(method=dynamic, per_channel=False)",
        "onnx_conversion > quantization(method=dynamic, per_channel=True)"]
