"""Structured pruning: whole channels and neurons leave the digits CNN, a residual CNN and a
transformer block's FFN, so the saved .pt2 has smaller weights; each step is kept only when
ONNX Runtime runs it faster; layers the pruner cannot follow are named, with the way out."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from optiserve.core.errors import ConfigError
from optiserve.data.binding import Dataset
from optiserve.demo.models import fit
from optiserve.passes import Artifact, PassContext, PassSkipped, get_pass
from tests.passes.test_qat import BasicBlock

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
torch = pytest.importorskip("torch")
nn = torch.nn



@pytest.fixture(scope="module")
def images(digits) -> SimpleNamespace:
    """The digits as 1x8x8 images."""
    return SimpleNamespace(x_train=digits.X_train.reshape(-1, 1, 8, 8), y_train=digits.y_train,
                           x_val=digits.X_val.reshape(-1, 1, 8, 8), y_val=digits.y_val)


def trained(net, x: np.ndarray, y: np.ndarray, *, epochs: int):
    """`net` trained with Adam on (x, y) for `epochs`, in eval mode."""
    torch.manual_seed(0)
    return fit(net, x, y, epochs=epochs, lr=3e-3)


def make_cnn():
    """conv(16)-BN-ReLU-pool, conv(32)-ReLU-pool, 128 -> 64 -> 10."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def cnn(images):
    """The digits CNN, ~95 % on the held-out digits."""
    return trained(make_cnn(), images.x_train, images.y_train, epochs=15)


def register(obj, workdir: Path, example=None) -> Artifact:
    """Store a torch model the way the registry does (TorchScript, or a torch.export file)."""
    from optiserve.convert.torch import import_torch_object

    workdir.mkdir(parents=True, exist_ok=True)
    imp = import_torch_object(obj, workdir, example_inputs=example)
    return Artifact(path=imp.path, format=imp.format, signature=imp.signature, meta=imp.meta)


def as_program(net, x):
    return torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module")
def cnn_artifacts(cnn, images, tmp_path_factory) -> dict[str, Artifact]:
    x = torch.from_numpy(images.x_train[:2])
    root = tmp_path_factory.mktemp("cnn")
    return {"torchscript": register(cnn, root / "ts", (x,)),
            "pt2": register(as_program(cnn, x), root / "pt2")}


def rows(x: np.ndarray, y: np.ndarray | None = None, name: str = "input") -> Dataset:
    return Dataset(inputs={name: x}, labels=y, description="digits")


def prune(artifact: Artifact, settings, workdir: Path, training: Dataset, **options) -> Artifact:
    cls = get_pass("structured_pruning")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample={}, training=training)
    return cls().run(artifact, cls.parse_config(options), ctx)


def weights(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights saved in a .pt2 program."""
    return {k: tuple(v.shape) for k, v in torch.export.load(str(path)).state_dict.items()}


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()


# -- the digits CNN ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_channels_shrink_to_multiples_of_round_to_and_accuracy_holds(
        tmp_path, settings, images, cnn, cnn_artifacts, fmt):
    out = prune(cnn_artifacts[fmt], settings, tmp_path / "wd",
                rows(images.x_train, images.y_train), ratio=0.5, round_to=16, iterations=1,
                require_faster=False, steps=300)
    assert out.format == "pt2" and out.passes[-1]["name"] == "structured_pruning"
    shapes = weights(out.path)
    # conv 32 -> 16 filters, so the Linear reads 16 x 2 x 2 features; Linear 64 -> 32 neurons;
    # the 16-channel stem is at round_to and the 10 logits are the output: both stay
    assert shapes["4.weight"] == (16, 16, 3, 3) and shapes["4.bias"] == (16,)
    assert shapes["8.weight"] == (32, 64) and shapes["10.weight"] == (10, 32)
    stem = next(v for k, v in shapes.items() if k.endswith("folded_weight"))
    assert stem == (16, 1, 3, 3)
    assert all(s[0] % 16 == 0 for k, s in shapes.items() if k.endswith("weight") and
               not k.startswith("10."))
    assert not any(k.startswith(("0.", "1.")) for k in shapes)  # pre-folding weights dropped
    note = out.notes[-1]
    assert "channels '4' 32 -> 16, '8' 64 -> 32" in note
    assert "parameters 13,706 -> 4,890, MACs per row 91,776 -> 48,448" in note
    assert "'10' (a model output)" in note and "16 channels, at round_to" in note
    assert "300 steps of fine-tuning (cross-entropy against the labels" in note

    got = predict(out.path, images.x_val)
    with torch.no_grad():
        ref = cnn(torch.from_numpy(images.x_val)).numpy()
    acc_before, acc_after = ((p.argmax(1) == images.y_val).mean() for p in (ref, got))
    assert acc_before > 0.93
    assert acc_after >= acc_before - 0.02


@pytest.mark.cpu_numerics
def test_removing_dead_channels_changes_no_output(tmp_path, settings, images, cnn):
    # Channels whose weights are zero are the least important: removing them must leave every
    # output exactly as it was, through the flatten into the Linear's feature blocks.
    net = make_cnn().eval()
    net.load_state_dict(cnn.state_dict())
    with torch.no_grad():
        net[4].weight[1::2] = 0
        net[4].bias[1::2] = 0
        net[8].weight[::2] = 0
        net[8].bias[::2] = 0
    x = torch.from_numpy(images.x_train[:2])
    art = register(net, tmp_path / "model", (x,))
    out = prune(art, settings, tmp_path / "wd", rows(images.x_train), ratio=0.5, round_to=16,
                require_faster=False, steps=0)
    note = out.notes[-1]  # in two steps: the Linear first (64 -> 48), then both
    assert "kept step(s) 1, 2; channels '8' 64 -> 32, '4' 32 -> 16;" in note
    # The same function is computed, but not bit for bit: narrower layers sum their products
    # in another order (another GEMM blocking, which differs between CPUs), so float32 rounding
    # moves the outputs by ~1e-7 of their size. What is promised is equality to that rounding:
    # every output within 1e-5 (checked below), hence each loss (an MSE) within (1e-5)^2.
    losses = [float(v) for v in re.findall(r"loss ([-+.e\d]+) right after", note)]
    assert len(losses) == 2 and all(0 <= v <= 1e-10 for v in losses), note
    assert "step 2: kept untimed (require_faster=false)" in note
    with torch.no_grad():
        ref = net(torch.from_numpy(images.x_val)).numpy()
    np.testing.assert_allclose(predict(out.path, images.x_val), ref, atol=1e-5)


@pytest.mark.slow
def test_pruned_program_runs_at_any_batch_and_converts_to_onnx(tmp_path, settings, images,
                                                                cnn_artifacts):
    import onnxruntime as ort

    out = prune(cnn_artifacts["torchscript"], settings, tmp_path / "wd", rows(images.x_train),
                ratio=0.5, round_to=16, require_faster=False, steps=20)
    assert "MSE against the original model's outputs" in out.notes[-1]  # no labels: distill
    for batch in (1, 7):
        assert predict(out.path, images.x_val[:batch]).shape == (batch, 10)
    cls = get_pass("onnx_conversion")
    (tmp_path / "onnx").mkdir()
    ctx = PassContext(workdir=tmp_path / "onnx", settings=settings,
                      sample={"input": images.x_val[:2]})
    converted = cls().run(out, cls.parse_config({}), ctx)
    session = ort.InferenceSession(str(converted.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": images.x_val[:7]})[0]
    np.testing.assert_allclose(got, predict(out.path, images.x_val[:7]), atol=1e-4)


# -- latency acceptance -----------------------------------------------------------------------
def wide_mlp(hidden: int):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10)).eval()


@pytest.mark.slow
def test_a_step_that_makes_onnx_runtime_faster_is_kept(tmp_path, settings, digits):
    # 512 -> 256 neurons in both hidden layers: about 3.4x fewer multiply-adds per row
    net = wide_mlp(512)
    art = register(net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    out = prune(art, settings, tmp_path / "wd", rows(digits.X_train, digits.y_train),
                ratio=0.5, iterations=1, steps=20)
    note = out.notes[-1]
    found = re.search(r"step 1: ([\d.]+) -> ([\d.]+) ms at batch 64 in ONNX Runtime "
                      r"\(([\d.]+)x, kept\), loss [\d.]+ right after; kept step\(s\) 1;", note)
    assert found, note
    assert float(found[3]) >= 1.05 and float(found[1]) > float(found[2])
    assert "'0' 512 -> 256, '2' 512 -> 256" in note
    assert weights(out.path)["2.weight"] == (256, 256)


@pytest.mark.slow
def test_a_step_that_is_not_faster_is_rejected_and_says_so(tmp_path, settings, digits):
    # 2 % of one layer's neurons, to a ragged count: nothing ONNX Runtime can run faster
    net = wide_mlp(256)
    art = register(net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(PassSkipped, match=r"no pruning step made the model faster: step 1: "
                       r"[\d.]+ -> [\d.]+ ms at batch 32 in ONNX Runtime \([\d.]+x, rejected: "
                       r"below min_speedup=1.05\)"):
        prune(art, settings, tmp_path / "wd", rows(digits.X_train, digits.y_train),
              ratio=0.02, round_to=1, iterations=1, steps=10, timing_batch_size=32)


# -- other architectures ----------------------------------------------------------------------


@pytest.mark.slow
def test_channels_joined_by_a_residual_add_are_pruned_together(tmp_path, settings, images):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                        nn.ReLU(), BasicBlock(32, 32, 1), BasicBlock(32, 64, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    # every odd channel dead in every conv (its BatchNorm too): removing them together, across
    # each residual Add, must leave the outputs exactly as they were
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.weight[1::2] = 0
            if isinstance(module, nn.BatchNorm2d):
                module.bias[1::2] = 0
    x = torch.from_numpy(images.x_train[:2])
    out = prune(register(as_program(net, x), tmp_path / "model"), settings, tmp_path / "wd",
                rows(images.x_train, images.y_train), ratio=0.5, round_to=8, iterations=1,
                require_faster=False, steps=0)
    # the stem and each block's last conv (and the projection) add into one stream
    assert "'3.c1' 32 -> 16, '3.c2+0' 32 -> 16, '4.c1' 64 -> 32, '4.c2+4.down.0' 64 -> 32" \
        in out.notes[-1]
    shapes = weights(out.path)
    assert shapes["7.weight"] == (10, 32)
    assert sorted(s for k, s in shapes.items() if len(s) == 4) == [
        (16, 1, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (32, 16, 1, 1), (32, 16, 3, 3),
        (32, 32, 3, 3)]
    with torch.no_grad():
        ref = net(torch.from_numpy(images.x_val)).numpy()
    np.testing.assert_allclose(predict(out.path, images.x_val), ref, atol=1e-5)


class Encoder(nn.Module):
    """A transformer block on 5 tokens: 4-head attention and a GELU FFN, both residual."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.embed = heads, nn.Linear(16, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
        x = self.ln1(x + self.o(att.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(nn.functional.gelu(self.up(x)))).mean(1)


@pytest.mark.slow
def test_transformer_ffn_neurons_are_pruned_and_attention_is_left_alone(tmp_path, settings):
    x = np.random.default_rng(0).standard_normal((256, 5, 16)).astype(np.float32)
    net = Encoder().eval()
    out = prune(register(net, tmp_path / "model", (torch.from_numpy(x[:2]),)), settings,
                tmp_path / "wd", rows(x, name="x"), ratio=0.5, round_to=8,
                require_faster=False, steps=30)
    note = out.notes[-1]
    assert "channels 'up' 256 -> 128;" in note
    assert "'q' (split across dimensions by view (as attention heads are); not pruned yet)" \
        in note
    assert "'embed+o' (normalized across them by layer_norm)" in note
    shapes = weights(out.path)
    assert shapes["up.weight"] == (128, 64) and shapes["down.weight"] == (64, 128)
    assert shapes["q.weight"] == (64, 64)
    with torch.no_grad():
        ref = net(torch.from_numpy(x[:7])).numpy()
    got = predict(out.path, x[:7])
    assert got.shape == ref.shape == (7, 64)


class Cumulative(nn.Module):
    """A cumulative sum over the hidden features: an operator the pruner does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.cumsum(torch.relu(self.a(x)), 1))))


def test_an_operator_it_cannot_follow_names_the_layer_and_ignore_layers(tmp_path, settings,
                                                                       digits):
    art = register(Cumulative().eval(), tmp_path / "model",
                   (torch.from_numpy(digits.X_train[:2]),))
    data = rows(digits.X_train, digits.y_train, "x")
    with pytest.raises(PassSkipped, match=r"cannot follow the output channels of layer 'a' "
                       r"through aten.cumsum \(node 'cumsum'\).* with ignore_layers=\['a'\]"):
        prune(art, settings, tmp_path / "wd", data, require_faster=False, steps=5)
    # as suggested: 'a' stays, the rest is pruned
    out = prune(art, settings, tmp_path / "wd2", data, ignore_layers=["a"], round_to=8,
                require_faster=False, steps=5)
    assert "channels 'b' 32 -> 16" in out.notes[-1]
    assert "'a' (in ignore_layers)" in out.notes[-1]
    assert weights(out.path)["a.weight"] == (64, 64)


def test_ignore_layers_naming_no_layer_lists_the_layers(tmp_path, settings, digits):
    art = register(Cumulative().eval(), tmp_path / "model",
                   (torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(ConfigError, match=r"ignore_layers names \['conv9'\], which are not "
                       r"layers of this model. Its Conv/Linear layers: a, b, c"):
        prune(art, settings, tmp_path / "wd", rows(digits.X_train, name="x"),
              ignore_layers=["conv9"])


def test_nothing_to_prune_is_skipped_with_the_reasons(tmp_path, settings, digits):
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    art = register(net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(PassSkipped, match=r"no layer has more than round_to=16 channels that "
                       r"can be pruned; left alone: '2' \(a model output\), '0' \(16 channels"):
        prune(art, settings, tmp_path / "wd", rows(digits.X_train), round_to=16)


def test_no_training_data_is_skipped_with_what_to_give(tmp_path, settings, cnn_artifacts):
    with pytest.raises(PassSkipped, match="structured_pruning needs training data"):
        prune(cnn_artifacts["pt2"], settings, tmp_path / "wd", None)


# -- through the optimizer --------------------------------------------------------------------
@pytest.mark.slow
def test_optimize_chains_pruning_conversion_and_quantization(tmp_path, sqlite_registry, images,
                                                            cnn):
    from optiserve import api

    api.register("digits-cnn", cnn, registry=sqlite_registry,
                 example_inputs=(torch.from_numpy(images.x_train[:2]),))
    np.savez(tmp_path / "train.npz", input=images.x_train, label=images.y_train)
    np.savez(tmp_path / "val.npz", input=images.x_val, label=images.y_val)
    result = api.optimize(
        "digits-cnn", registry=sqlite_registry,
        optimizations=["structured_pruning", "onnx_conversion", "quantization"],
        pass_configs={"structured_pruning": {"require_faster": False, "round_to": 16,
                                             "steps": 200}},
        # static: dynamic INT8 of a torch.export model's ONNX fails in ONNX Runtime's shape
        # inference (the dynamo exporter's value_info on weights), whatever made the .pt2
        quantization_config={"method": "static", "per_channel": False,
                             "calibrate_method": "minmax"},
        training_dataset={"source": "file", "path": str(tmp_path / "train.npz"),
                          "label_column": "label"},
        validation_dataset={"source": "file", "path": str(tmp_path / "val.npz"),
                            "label_column": "label"},
        accuracy_threshold=0.97, batch_sizes=[64], iterations=20, warmup=2)
    by_label = {c.artifact.label: c for c in result.candidates}
    pruned = "structured_pruning(ratio=0.5, round_to=16, require_faster=False, steps=200)"
    static = "quantization(method=static, per_channel=False, calibrate_method=minmax)"
    # the pruned network goes through conversion and INT8, and the original beside it
    # (structured_pruning is an alternative-making pass), so both compete in ONNX Runtime
    assert set(by_label) == {pruned, f"{pruned} > onnx_conversion",
                             f"{pruned} > onnx_conversion > {static}", "onnx_conversion",
                             f"onnx_conversion > {static}"}, result.notes
    assert by_label[pruned].gate.passed and by_label[f"{pruned} > onnx_conversion"].gate.passed
    assert result.status == "completed"
    assert sqlite_registry.resolve("digits-cnn").version >= 2  # the winner is registered
