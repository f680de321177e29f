"""The CLI as a user runs it: a real process, real exit codes, one readable line per mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import linear_onnx, save_onnx


def cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTISERVE_")}
    env.update(OPTISERVE_HOME=str(home), COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "optiserve", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_register_optimize_benchmark_list(tmp_path, optiserve_home):
    model = save_onnx(linear_onnx(8, 3), tmp_path / "lin.onnx")
    reg = cli("register", "lin", str(model), "--json", home=optiserve_home)
    assert reg.returncode == 0, reg.stderr
    info = json.loads(reg.stdout)
    assert info["version"] == 1 and info["format"] == "onnx" and len(info["sha256"]) == 64

    opt = cli("optimize", "lin", "--opt", "quantization", "--threshold", "0.9",
              "--iterations", "20", "--warmup", "2", "--json", home=optiserve_home)
    assert opt.returncode == 0, opt.stderr
    body = json.loads(opt.stdout)
    assert set(body) == {"optimization_id", "status", "original", "optimized", "improvement",
                         "artifact_id"}
    assert body["status"] == "completed" and body["artifact_id"] == "lin-v2"

    bench = cli("benchmark", "lin:2", "--batch-sizes", "1,4", "--iterations", "20",
                "--warmup", "2", "--json", home=optiserve_home)
    assert bench.returncode == 0, bench.stderr
    results = json.loads(bench.stdout)["benchmark"]["results"]
    assert set(results) == {"batch_1", "batch_4"}

    listing = cli("models", "list", "--json", home=optiserve_home)
    assert json.loads(listing.stdout) == [{"model": "lin", "versions": 2, "latest": 2}]


@pytest.mark.slow
def test_optimize_reads_the_rest_body_from_a_file(tmp_path, optiserve_home):
    """--config holds the body of POST /api/v1/inference/optimize (the seed's
    quantization_config included); flags and --set go over it."""
    model = save_onnx(linear_onnx(8, 3), tmp_path / "lin.onnx")
    assert cli("register", "lin", str(model), home=optiserve_home).returncode == 0
    (tmp_path / "req.yaml").write_text(
        "optimizations: [quantization]\n"
        "quantization_config: {method: dynamic, precision: int8}\n"
        "accuracy_threshold: 0.5\niterations: 20\nwarmup: 2\n")
    opt = cli("optimize", "lin", "--config", str(tmp_path / "req.yaml"), "--threshold", "0.9",
              "--set", "quantization.per_channel=false", "--json", "--details",
              home=optiserve_home)
    assert opt.returncode == 0, opt.stderr
    details = json.loads(opt.stdout)["details"]
    assert details["threshold"] == 0.9
    configs = [p["config"] for c in details["candidates"] for p in c["passes"]
               if p["name"] == "quantization"]
    assert configs and all(c["method"] == "dynamic" and c["per_channel"] is False
                           for c in configs)


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (("register", "m", "missing.onnx"), "no such file"),
    (("optimize", "nobody"), "No model 'nobody'"),
    (("optimize", "m", "--threshold", "1.5"), "accuracy_threshold' is invalid: Input should be less than or equal to 1"),
    (("optimize", "m", "--opt", "bogus"), "Unknown optimization 'bogus'"),
    (("optimize", "m", "--set", "quantization.colour=red"), "colour"),
    (("optimize", "m", "--set", "quantization=static"), "is not PASS.OPTION=VALUE"),
    (("optimize", "m", "--config", "/nonexistent/req.yaml"), "Cannot read"),
    (("optimize", "m", "--validation-sql", "DELETE FROM t"), "not a SELECT"),
    (("benchmark", "m", "--batch-sizes", "1,x"), "comma-separated integers"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, optiserve_home, args, needle):
    save_onnx(linear_onnx(4, 2), tmp_path / "m.onnx")
    assert cli("register", "m", str(tmp_path / "m.onnx"), home=optiserve_home).returncode == 0
    proc = cli(*args, home=optiserve_home)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)
    listing = cli("models", "list", "--json", home=optiserve_home)
    assert json.loads(listing.stdout)[0]["versions"] == 1  # nothing was added


@pytest.mark.slow
def test_gate_failure_exits_3_and_keeps_a_rejected_version(tmp_path, optiserve_home):
    save_onnx(linear_onnx(16, 4), tmp_path / "m.onnx")
    cli("register", "m", str(tmp_path / "m.onnx"), home=optiserve_home)
    proc = cli("optimize", "m", "--opt", "quantization", "--threshold", "1.0", "--iterations",
               "10", "--warmup", "1", home=optiserve_home)
    assert proc.returncode == 3
    assert "Closest:" in one_line_error(proc)
    assert "candidates" in proc.stdout  # the report is still shown
    listing = cli("models", "list", "--json", home=optiserve_home)
    assert json.loads(listing.stdout) == [{"model": "m", "versions": 2, "latest": 1}]


def test_config_prints_the_seed_variables(optiserve_home):
    proc = cli("config", "--json", home=optiserve_home)
    values = json.loads(proc.stdout)
    assert values["OPTIMIZATION_MAX_TIME_MINUTES"] == 30
    assert values["OPTIMIZATION_ACCURACY_THRESHOLD"] == 0.99
    assert values["TENSORRT_WORKSPACE_SIZE_GB"] == 4
    assert values["ONNX_OPSET_VERSION"] == 17
    assert "OPTISERVE_DATA_SOURCE_DEMO" in values


@pytest.mark.slow
@pytest.mark.integration
def test_demo_churn_runs_the_seed_request(optiserve_home):
    pytest.importorskip("sklearn")
    proc = cli("demo", "--skip-minilm", "--skip-cnn", home=optiserve_home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "churn: scikit-learn pipeline, the seed's request" in proc.stdout
    assert "status: completed" in proc.stdout and "artifact: churn-v2" in proc.stdout
    assert (optiserve_home / "demo" / "ml_features.db").is_file()


@pytest.mark.slow
def test_keys_create_list_revoke(optiserve_home):
    made = cli("keys", "create", "ci-bot", "--scope", "read", "--scope", "optimize",
               home=optiserve_home)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("osk_") and "not shown again" in made.stderr
    listed = json.loads(cli("keys", "list", "--json", home=optiserve_home).stdout)
    assert [(k["name"], k["scopes"], k["revoked_at"]) for k in listed] == [
        ("ci-bot", ["optimize", "read"], None)]
    assert token.split("_", 2)[2] not in json.dumps(listed)
    revoked = cli("keys", "revoke", listed[0]["id"], home=optiserve_home)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert json.loads(cli("keys", "list", "--json", home=optiserve_home).stdout)[0]["revoked_at"]
    bad = cli("keys", "create", "x", "--scope", "root", home=optiserve_home)
    assert bad.returncode == 2 and "root" in one_line_error(bad)
    again = cli("keys", "revoke", "nobody", home=optiserve_home)
    assert again.returncode == 2 and "No active API key" in one_line_error(again)
