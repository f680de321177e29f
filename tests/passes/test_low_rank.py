"""Low-rank approximation: a wide digits MLP and a small CNN have their Linear/Conv weights
factored by truncated SVD into the ranks the note gives, only where that is cheaper; the .pt2
runs at any batch size, converts to ONNX, fine-tunes back what the truncation lost, and goes
through the optimizer's gate and benchmark like every candidate."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import optiserve
from optiserve.core.errors import ConfigError
from optiserve.data.binding import Dataset
from optiserve.passes import Artifact, PassContext, PassSkipped, get_pass
from tests.builders import linear_onnx, save_onnx
from tests.passes.helpers import onnx_artifact, run_pass

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
torch = pytest.importorskip("torch")
nn = torch.nn

LAYER = re.compile(r"(\S+) \((\d+)x(\d+)(?:x\d+)*\) rank (\d+)/(\d+)")



@pytest.fixture(scope="module")
def wide_mlp(digits):
    """64 -> 512 -> 512 -> 10, 300 Adam steps on digits (~92 % held out, ~2 s): wide enough
    that factoring its 512 x 512 layer pays."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xs, ys = torch.from_numpy(digits.X_train), torch.from_numpy(digits.y_train)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(xs), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
        opt.step()
    return net.eval()


def _register(obj, workdir: Path, example=None) -> Artifact:
    """Store a torch model the way the registry does (TorchScript, or a torch.export file)."""
    from optiserve.convert.torch import import_torch_object

    workdir.mkdir(parents=True, exist_ok=True)
    imp = import_torch_object(obj, workdir, example_inputs=example)
    return Artifact(path=imp.path, format=imp.format, signature=imp.signature, meta=imp.meta)


@pytest.fixture(scope="module")
def wide(wide_mlp, digits, tmp_path_factory) -> Artifact:
    return _register(wide_mlp, tmp_path_factory.mktemp("wide"),
                     (torch.from_numpy(digits.X_train[:2]),))


def _low_rank(artifact: Artifact, settings, workdir: Path, training=None, deadline=None,
              **options) -> Artifact:
    cls = get_pass("low_rank")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample={}, training=training,
                      deadline=deadline)
    return cls().run(artifact, cls.parse_config(options), ctx)


def _digits_rows(digits) -> Dataset:
    return Dataset(inputs={"input": digits.X_train}, labels=digits.y_train,
                   description="digits")


def _weights(path: Path) -> dict[str, np.ndarray]:
    """The saved program's weight matrices (and kernels) by name; biases left out."""
    state = torch.export.load(str(path)).state_dict
    return {k: v.detach().numpy() for k, v in state.items() if v.dim() >= 2}


def _predict(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    from optiserve.convert.torch import load_runnable

    with torch.no_grad():
        return load_runnable(path, fmt)(torch.from_numpy(x)).numpy()


def _factored(note: str) -> dict[str, tuple[int, int, int, int]]:
    """{layer: (out, in, rank, full rank)} as the note lists them."""
    done = note.split("; left dense:")[0]
    return {m[1]: tuple(int(v) for v in m.groups()[1:]) for m in LAYER.finditer(done)}


# -- the factoring -----------------------------------------------------------------------------
@pytest.mark.slow
def test_factors_each_linear_into_two_of_the_noted_rank(tmp_path, settings, digits, wide_mlp,
                                                        wide):
    out = _low_rank(wide, settings, tmp_path / "wd", energy=0.8)
    assert out.format == "pt2" and out.passes[-1]["name"] == "low_rank"
    assert out.signature == wide.signature
    note = out.notes[-2]
    layers = _factored(note)
    assert set(layers) == {"0", "2", "4"}  # the output layer: rank 8 of 10 is still cheaper
    weights = _weights(out.path)
    assert len(weights) == 6  # two factors per layer, the dense weights gone
    for i, (name, (rows, cols, rank, full)) in enumerate(layers.items()):
        assert full == min(rows, cols) and rank % 8 == 0 and rank < full
        assert rank * (rows + cols) < rows * cols  # only where it is cheaper
        assert weights[f"low_rank_{i}_down"].shape == (rank, cols)
        assert weights[f"low_rank_{i}_up"].shape == (rows, rank)
        product = weights[f"low_rank_{i}_up"] @ weights[f"low_rank_{i}_down"]
        assert np.linalg.matrix_rank(product, tol=1e-4) == rank
    assert 96 <= layers["2"][2] <= 160  # 80 % of its energy: about a quarter of the ranks
    assert "not fine-tuned (no training data" in out.notes[-1]

    ref = wide_mlp(torch.from_numpy(digits.X_val)).detach().numpy()
    got = _predict(out.path, "pt2", digits.X_val)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.slow
def test_energy_one_keeps_a_low_rank_layer_exactly_and_leaves_full_rank_ones(
        tmp_path, settings, digits, wide_mlp):
    net = copy.deepcopy(wide_mlp)  # its 512 x 512 weight cut to rank 48: exactly low rank
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(net[2].weight, full_matrices=False)
        net[2].weight.copy_((u[:, :48] * s[:48]) @ vh[:48])
    art = _register(net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    out = _low_rank(art, settings, tmp_path / "wd", energy=1.0)
    note = out.notes[-2]
    assert _factored(note) == {"2": (512, 512, 48, 512)}
    assert "keeping 100.0% energy" in note
    # full rank: factored they would hold more weights than dense, so they are left alone
    assert ("0 (512x64): not cheaper (rank 64 of 64 keeps 100.0% energy with 36,864 weights, "
            "dense 32,768)") in note
    assert "4 (10x512): not cheaper (rank 10 of 10" in note
    assert "parameters 301,066 -> 88,074" in note  # 512 x 512 -> 48 x (512 + 512)

    with torch.no_grad():
        ref = net(torch.from_numpy(digits.X_val)).numpy()
    got = _predict(out.path, "pt2", digits.X_val)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_lower_energy_keeps_fewer_weights_and_macs(tmp_path, settings, wide):
    dense = 64 * 512 + 512 * 512 + 512 * 10  # an MLP's MACs per row are its weights
    kept = []
    for energy in (0.95, 0.8, 0.6):
        out = _low_rank(wide, settings, tmp_path / str(energy), energy=energy)
        kept.append(sum(w.size for w in _weights(out.path).values()))
        assert "MACs per row 0.30M -> " in out.notes[-2]
    assert dense > kept[0] > kept[1] > kept[2]
    assert kept[2] < dense / 4


def test_param_budget_spends_at_most_its_fraction(tmp_path, settings, wide):
    out = _low_rank(wide, settings, tmp_path / "wd", param_budget=0.3)
    dense = 64 * 512 + 512 * 512 + 512 * 10
    kept = sum(w.size for w in _weights(out.path).values())
    assert kept <= 0.3 * dense
    shown = float(re.search(r"param_budget 0.3: ([\d.]+)% of the factorable weights kept",
                            out.notes[-2])[1])
    assert shown == pytest.approx(100 * kept / dense, abs=0.05)
    assert _factored(out.notes[-2])["2"][2] < 128  # the big layer gives up the most


@pytest.fixture(scope="module")
def cnn(digits):
    """conv-BN-ReLU, conv 32 -> 64 (the one worth factoring), pool, a grouped conv, pool,
    Linear: briefly trained on digits as 1x8x8 images."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xs = torch.from_numpy(digits.X_train.reshape(-1, 1, 8, 8))
    ys = torch.from_numpy(digits.y_train)
    for idx in torch.randperm(len(xs), generator=torch.Generator().manual_seed(0)).split(64):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
        opt.step()
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_conv_becomes_a_kxk_conv_to_the_rank_then_a_1x1(tmp_path, settings, digits, cnn, fmt):
    x = torch.from_numpy(digits.X_train[:2].reshape(-1, 1, 8, 8))
    obj = cnn if fmt == "torchscript" else torch.export.export(
        cnn, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    out = _low_rank(_register(obj, tmp_path / "model", (x,)), settings, tmp_path / "wd",
                    energy=0.9, min_size=0)
    note = out.notes[-2]
    (rows, cols, rank, full), = [v for k, v in _factored(note).items() if k == "3"]
    assert (rows, cols, full) == (64, 32, 64) and rank * (32 * 9 + 64) < 64 * 32 * 9
    weights = _weights(out.path)
    down, up = (w for k, w in weights.items() if k.startswith("low_rank_0_"))
    assert down.shape == (rank, 32, 3, 3) and up.shape == (64, rank, 1, 1)
    assert "6 (64x16x3x3): grouped or depthwise convolution (groups=4)" in note
    assert "(32x1x3x3): not cheaper at any rank" in note  # 9 inputs per output: nothing to gain

    images = digits.X_val.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        ref = cnn(torch.from_numpy(images)).numpy()
    got = _predict(out.path, "pt2", images)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


# -- what the .pt2 does next -------------------------------------------------------------------
@pytest.mark.slow
def test_the_program_runs_at_any_batch_and_converts_to_onnx(tmp_path, settings, digits, wide):
    from optiserve.runtimes.base import load_runtime

    out = _low_rank(wide, settings, tmp_path / "wd", energy=0.7)
    runtime = load_runtime(out.path, out.signature, format="pt2", threads=1)
    runtime.load()
    by_batch = {b: runtime.predict({"input": digits.X_val[:b]})["output"] for b in (1, 7)}
    assert by_batch[1].shape == (1, 10) and by_batch[7].shape == (7, 10)
    np.testing.assert_allclose(by_batch[1], by_batch[7][:1], atol=1e-5)

    onnx_out = run_pass("onnx_conversion", out, settings, tmp_path / "onnx",
                        sample={"input": digits.X_val[:2]})
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_out.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": digits.X_val[:7]})[0]
    np.testing.assert_allclose(got, by_batch[7], atol=1e-4)
    kinds = [n.op_type for n in onnx.load(str(onnx_out.path)).graph.node]
    assert kinds.count("Gemm") + kinds.count("MatMul") == 6  # two products per layer


@pytest.mark.slow
def test_fine_tuning_lowers_the_loss_and_keeps_accuracy(tmp_path, settings, digits, wide_mlp,
                                                       wide):
    out = _low_rank(wide, settings, tmp_path / "wd", _digits_rows(digits), energy=0.5)
    note = out.notes[-1]
    assert "low_rank fine-tuning: 300 steps (cross-entropy against the labels, 1400 rows " \
           "of digits)" in note
    factored, tuned = (float(v) for v in re.search(r"factored ([\d.e-]+) -> ([\d.e-]+)",
                                                   note).groups())
    assert tuned < factored
    assert re.search(r"arg-max agreement with the original [\d.]+% -> [\d.]+% on 512 training "
                     "rows", note)
    acc = {name: (pred.argmax(1) == digits.y_val).mean() for name, pred in (
        ("original", wide_mlp(torch.from_numpy(digits.X_val)).detach().numpy()),
        ("tuned", _predict(out.path, "pt2", digits.X_val)))}
    assert acc["original"] > 0.9 and acc["tuned"] >= acc["original"] - 0.02


def test_the_runs_time_limit_stops_fine_tuning_and_says_so(tmp_path, settings, digits, wide):
    out = _low_rank(wide, settings, tmp_path / "wd", _digits_rows(digits), energy=0.8,
                    steps=100_000, deadline=time.monotonic() + 0.01)
    assert "stopped by OPTIMIZATION_MAX_TIME_MINUTES" in out.notes[-1]
    assert out.path.is_file()  # what was factored (and trained) is still saved


# -- what the pass refuses ---------------------------------------------------------------------
def test_energy_and_param_budget_together_is_a_config_error_before_any_work(sqlite_registry,
                                                                          digits, wide_mlp):
    with pytest.raises(ConfigError, match="energy=0.9 and param_budget=0.5 both choose the "
                                          "ranks; give one of them"):
        get_pass("low_rank").parse_config({"energy": 0.9, "param_budget": 0.5})
    optiserve.register("wide", wide_mlp, registry=sqlite_registry,
                       example_inputs=(torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(ConfigError, match="param_budget"):
        optiserve.optimize("wide", registry=sqlite_registry, optimizations=["low_rank"],
                           pass_configs={"low_rank": {"energy": 0.9, "param_budget": 0.5}})
    assert [v.version for v in sqlite_registry.versions("wide")] == [1]


def test_no_layer_worth_factoring_is_skipped_with_the_reasons(tmp_path, settings, digits,
                                                              digits_net):
    art = _register(digits_net, tmp_path / "model", (torch.from_numpy(digits.X_train[:2]),))
    with pytest.raises(PassSkipped, match="no layer is worth factoring: ") as skipped:
        _low_rank(art, settings, tmp_path / "wd")
    assert "out (10x128): 1,280 weights, under min_size=4,096" in str(skipped.value)
    # random ReLU features: a flat spectrum, so 90 % of the energy needs most of the ranks
    assert re.search(r"hidden \(128x64\): not cheaper \(rank \d+ of 64 keeps [\d.]+% energy "
                     r"with [\d,]+ weights, dense 8,192\)", str(skipped.value))


class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


def test_a_model_without_linear_or_conv_is_skipped(tmp_path, settings):
    art = _register(NoLayers(), tmp_path / "model", (torch.rand(2, 6),))
    with pytest.raises(PassSkipped, match="no Conv or Linear layer to factor; the graph has "
                                          "mul, relu"):
        _low_rank(art, settings, tmp_path / "wd")


def test_steps_asked_for_without_training_data_is_skipped(tmp_path, settings, wide):
    with pytest.raises(PassSkipped, match="low_rank needs training data: give training_dataset"):
        _low_rank(wide, settings, tmp_path / "wd", steps=50)


def test_non_torch_artifact_is_skipped(tmp_path, settings):
    art = onnx_artifact(save_onnx(linear_onnx(), tmp_path / "m.onnx"))
    with pytest.raises(PassSkipped, match="trains PyTorch models; this artifact is onnx"):
        _low_rank(art, settings, tmp_path / "wd")


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_optimize_gates_and_times_the_factored_candidates(sqlite_registry, tmp_path, digits,
                                                          wide_mlp):
    optiserve.register("wide", wide_mlp, registry=sqlite_registry,
                       example_inputs=(torch.from_numpy(digits.X_train[:2]),))
    np.savez(tmp_path / "train.npz", input=digits.X_train, label=digits.y_train)
    np.savez(tmp_path / "val.npz", input=digits.X_val, label=digits.y_val)
    result = optiserve.optimize(
        "wide", registry=sqlite_registry, optimizations=["low_rank", "onnx_conversion"],
        validation_dataset={"source": "file", "path": str(tmp_path / "val.npz"),
                            "label_column": "label"},
        training_dataset={"source": "file", "path": str(tmp_path / "train.npz"),
                          "label_column": "label"},
        accuracy_threshold=0.97, iterations=20, warmup=2)
    labels = [c.artifact.label for c in result.candidates]
    # the unfactored original goes on to onnx_conversion too (low_rank makes an alternative)
    assert labels == ["low_rank(energy=0.9)", "low_rank(energy=0.9) > onnx_conversion",
                      "onnx_conversion"]
    assert all(c.gate is not None and c.latency[1].p50_ms > 0 for c in result.candidates)
    assert result.status == "completed" and result.chosen.gate.passed
    # the report carries parameters and MACs before/after, to the ONNX made from it too
    cands = result.details()["details"]["candidates"]
    stats = [c["model_stats"] for c in cands]
    assert stats[0] == stats[1] and stats[2] is None
    assert stats[0]["params"][1] < stats[0]["params"][0]
    assert stats[0]["macs"][1] < stats[0]["macs"][0]
    notes = " | ".join(result.candidates[1].artifact.notes)
    assert "low_rank: factored" in notes and "low_rank fine-tuning: 300 steps" in notes
    # the reported speed-up is the measured one, whichever candidate won
    measured = 1 - result.chosen.latency[1].p50_ms / result.original.latency[1].p50_ms
    assert result.response["improvement"]["latency_reduction"] == f"{measured * 100:.1f}%"
