"""What tripped a newcomer (issue 14): the home found like git's repository, an empty listing
that says which home it read, --version, help without type noise, the Pareto chart's title,
`infer` and `models delete` on the local registry, and `runs` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import typer.testing

from optiserve.api import register
from tests.builders import linear_onnx, save_onnx
from tests.cli.test_cli import cli, one_line_error


def cli_in(folder: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI run from `folder`, with OPTISERVE_HOME set only when `home` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTISERVE_")}
    env["COLUMNS"] = "200"
    if home is not None:
        env["OPTISERVE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "optiserve", *args], capture_output=True,
                          text=True, env=env, cwd=folder, timeout=120)


def lin_outputs(x: np.ndarray, n_in: int = 4, n_out: int = 2, seed: int = 0) -> np.ndarray:
    """What tests.builders.linear_onnx computes: x @ W + B."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    return x.astype(np.float32) @ w + b


# -- 1. the home, found like git's repository ----------------------------------------------
@pytest.mark.slow
def test_home_is_found_in_a_parent_folder_and_an_empty_listing_names_it(tmp_path):
    project = tmp_path / "project"
    deep = project / "src" / "deeper"
    deep.mkdir(parents=True)
    model = save_onnx(linear_onnx(4, 2), tmp_path / "lin.onnx")
    made = cli_in(project, "register", "lin", str(model))  # no OPTISERVE_HOME: ./.optiserve
    assert made.returncode == 0, made.stderr
    assert (project / ".optiserve" / "registry.db").is_file()

    found = cli_in(deep, "models", "list", "--json")  # two folders below: found above
    assert json.loads(found.stdout) == [{"model": "lin", "versions": 1, "latest": 1}]
    assert not (deep / ".optiserve").exists()
    config = json.loads(cli_in(deep, "config", "--json").stdout)
    assert config["OPTISERVE_HOME"] == str((project / ".optiserve").resolve())

    other = tmp_path / "elsewhere"
    other.mkdir()
    empty = cli_in(other, "models", "list")  # none above: ./.optiserve, said so
    assert empty.returncode == 0 and empty.stdout == ""
    assert f"no models in the registry in {(other / '.optiserve').resolve()}" in empty.stderr

    explicit = cli_in(deep, "models", "list", home=tmp_path / "own")  # the variable wins
    assert f"no models in the registry in {(tmp_path / 'own').resolve()} (OPTISERVE_HOME)" \
        in explicit.stderr


@pytest.mark.slow
def test_empty_runs_deployments_and_keys_listings_name_the_home(optiserve_home):
    for args, what in ((("runs", "list"), "optimization runs"),
                       (("deployments",), "deployments"), (("keys", "list"), "API keys")):
        proc = cli(*args, home=optiserve_home)
        assert proc.returncode == 0, proc.stderr
        assert f"no {what} in the registry in {optiserve_home.resolve()} (OPTISERVE_HOME)" \
            in proc.stderr


# -- 4. help, --version, the Pareto chart ----------------------------------------------------
@pytest.fixture
def invoke(monkeypatch):
    """The CLI in-process, as `optiserve` runs it (with its help tidied)."""
    from optiserve.cli import main

    monkeypatch.setattr(typer.testing, "_get_command", lambda app: main.command())
    runner = typer.testing.CliRunner()

    def run(*args: str):
        return runner.invoke(main.app, list(args), env={"COLUMNS": "200"})
    return run


def _commands(cmd, path=()):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_page_is_free_of_type_tags(invoke):
    from optiserve.cli import main

    paths = list(_commands(main.command()))
    assert ("infer",) in paths and ("models", "delete") in paths and ("load",) in paths
    assert {("runs", c) for c in ("list", "show", "watch", "cancel")} <= set(paths)
    for path in paths:
        out = invoke(*path, "--help")
        assert out.exit_code == 0, (path, out.output)
        for tag in ("<bool>", "<str>", "<int>", "<float>", "<list[str]>", "<Path>"):
            assert tag not in out.output, (path, tag)
    opt = invoke("optimize", "--help").output
    assert "--iterations" in opt and "INT" in opt and "--json" in opt


def test_help_names_every_format_and_every_training_pass(invoke):
    text = " ".join(invoke("register", "--help").output.split())
    for fmt in (".pkl", ".skops", ".onnx", ".pt ", ".pt2", ".keras", "SavedModel", "XGBoost",
                "LightGBM"):
        assert fmt in text, fmt
    text = " ".join(invoke("optimize", "--help").output.split())
    for name in ("pruning", "lottery_ticket", "structured_pruning", "distillation", "low_rank",
                 "qat"):
        assert name in text.split("--training-file", 1)[1].split("--threshold")[0], name


def test_version(invoke):
    import optiserve

    out = invoke("--version")
    assert out.exit_code == 0 and out.output.strip() == f"optiserve {optiserve.__version__}"
    proc = cli("--version", home=Path("unused"))
    assert proc.returncode == 0 and proc.stdout.strip() == f"optiserve {optiserve.__version__}"


def test_pareto_title_fits_inside_a_one_panel_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from optiserve.optimizer import pareto

    def cand(lat, val, size, passed=True, label="x"):
        return NS(latency={1: NS(p50_ms=lat)}, evaluation=NS(value=val, metric="accuracy"),
                  size_bytes=size, gate=NS(passed=passed, required=0.73), artifact=NS(label=label))
    orig = cand(16.0, 0.74, 15e6, label="original")
    orig.gate = None
    cands = [cand(0.02, 0.739, 7e6, label="onnx_conversion"),
             cand(0.015, 0.70, 3e6, False, label="onnx_conversion > quantization")]
    result = NS(original=orig, candidates=cands, chosen=cands[0], threshold=0.99,
                run_id="opt-7d536b5dde0a")
    path = Path(pareto.save(result, tmp_path, print))
    image = np.asarray(Image.open(path).convert("L"))
    # the title is the first ink from the top; nothing of it may touch the left/right edges
    top = image[: image.shape[0] // 12]
    assert (top < 128).any(), "no title drawn"
    assert (top[:, :3] > 200).all() and (top[:, -3:] > 200).all(), "the title is cut off"


# -- 5. infer, models delete and runs on the local registry ---------------------------------
@pytest.fixture
def lin(tmp_path, sqlite_registry):
    register("lin", save_onnx(linear_onnx(4, 2), tmp_path / "lin.onnx"), registry=sqlite_registry)
    return sqlite_registry


@pytest.mark.slow
def test_infer_locally_from_npz_json_and_inline(lin, tmp_path, optiserve_home):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    np.savez(tmp_path / "rows.npz", x=x, label=np.array([0, 1, 0]))  # labels are left out
    proc = cli("infer", "lin", str(tmp_path / "rows.npz"), "--json", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_name"] == "lin" and out["model_version"] == "1"
    np.testing.assert_allclose(out["outputs"]["y"], lin_outputs(x), rtol=1e-5, atol=1e-5)

    (tmp_path / "rows.json").write_text(json.dumps({"x": x.tolist()}))
    proc = cli("infer", "lin:1", str(tmp_path / "rows.json"), "--json", home=optiserve_home)
    np.testing.assert_allclose(json.loads(proc.stdout)["outputs"]["y"], lin_outputs(x),
                               rtol=1e-5, atol=1e-5)

    # one row, no batch dimension, inline; the table view
    proc = cli("infer", "lin", "[0.1, 0.2, 0.3, 0.4]", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    assert "lin version 1" in proc.stdout and "y  float32  shape [1, 2]" in proc.stdout
    expected = lin_outputs(np.array([[0.1, 0.2, 0.3, 0.4]]))[0]
    assert f"{expected[0]:.4f}"[:5] in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("data, needle", [
    ("[[1, 2, 3]]", "Input 'x'"),  # three columns for four
    ('{"z": [[1, 2, 3, 4]], "w": [1]}', "The data has no input 'x'"),
    ("[[1, 2", "not valid JSON"),
    ("missing.npz", "no file here, nor inline JSON"),
])
def test_infer_mistakes_are_one_line(lin, optiserve_home, data, needle):
    proc = cli("infer", "lin", data, home=optiserve_home)
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)


@pytest.mark.slow
def test_infer_an_unknown_model_says_so(optiserve_home, sqlite_registry):
    proc = cli("infer", "ghost", "[[1]]", home=optiserve_home)
    assert proc.returncode == 2 and "No model 'ghost'" in one_line_error(proc)


@pytest.mark.slow
def test_models_delete_locally(lin, optiserve_home):
    proc = cli("models", "delete", "lin", home=optiserve_home)  # asks; no answer: nothing done
    assert proc.returncode == 1 and lin.versions("lin")
    assert cli("deploy", "lin", home=optiserve_home).returncode == 0
    refused = cli("models", "delete", "lin", "--yes", home=optiserve_home)
    assert refused.returncode == 2 and "served by deployment lin" in one_line_error(refused)
    lin.deployments.remove("lin")
    run_id = lin.runs.create("lin", {"model_id": "lin:1"}, status="queued")
    busy = cli("models", "delete", "lin", "--yes", home=optiserve_home)
    assert busy.returncode == 2 and f"runs cancel {run_id}" in one_line_error(busy)
    lin.runs.request_cancel(run_id)
    proc = cli("models", "delete", "lin", "--yes", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr
    assert "deleted model lin (1 version(s))" in proc.stderr
    assert json.loads(cli("models", "list", "--json", home=optiserve_home).stdout) == []


@pytest.mark.slow
def test_runs_list_show_cancel_locally(lin, optiserve_home):
    run_id = lin.runs.create("lin", {"model_id": "lin:1", "optimizations": ["quantization"]},
                             status="queued")
    listed = json.loads(cli("runs", "list", "--json", home=optiserve_home).stdout)
    assert [(j["optimization_id"], j["status"]) for j in listed] == [(run_id, "queued")]
    shown = cli("runs", "show", run_id, home=optiserve_home)
    assert shown.returncode == 0 and run_id in shown.stdout and "queued" in shown.stdout
    assert "passes: quantization" in shown.stdout
    cancelled = cli("runs", "cancel", run_id, home=optiserve_home)
    assert cancelled.returncode == 0 and f"{run_id}: cancelled" in cancelled.stderr
    assert lin.runs.get(run_id)["status"] == "cancelled"
    again = cli("runs", "cancel", run_id, home=optiserve_home)
    assert again.returncode == 2 and "already ended" in one_line_error(again)
    watched = cli("runs", "watch", run_id, home=optiserve_home)  # ended: returns at once
    assert watched.returncode == 1 and "cancelled" in watched.stdout
