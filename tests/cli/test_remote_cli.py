"""The CLI pointed at a running server (--server / OPTISERVE_SERVER_URL with --key /
OPTISERVE_API_KEY): a real server on a loopback port, the CLI in its own process."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from optiserve.api import register
from tests.builders import linear_onnx, save_onnx
from tests.cli.test_cli import cli, one_line_error
from tests.cli.test_newcomer import lin_outputs
from tests.server.conftest import free_port, make_server  # noqa: F401  (the fixture)


@pytest.fixture
def live(make_server, tmp_path):  # noqa: F811
    """A server (no job runner) whose registry holds model 'lin' (4 -> 2), not deployed."""
    server = make_server(jobs=False)
    register("lin", save_onnx(linear_onnx(4, 2), tmp_path / "lin.onnx"),
             registry=server.registry)
    return server


def remote(live, *args: str, key: str | None = "admin", env_vars: bool = False):
    """The CLI against `live`: flags, or (env_vars) OPTISERVE_SERVER_URL / OPTISERVE_API_KEY."""
    key = live.admin if key == "admin" else key
    home = live.settings.home
    if not env_vars:
        return cli(*args, "--server", live.url, *(("--key", key) if key else ()), home=home)
    old = dict(os.environ)
    os.environ.update(OPTISERVE_SERVER_URL=live.url, **({"OPTISERVE_API_KEY": key} if key
                                                        else {}))
    try:  # cli() drops OPTISERVE_* from the environment it copies: pass them through
        env = {k: v for k, v in os.environ.items()}
        return subprocess.run([sys.executable, "-m", "optiserve", *args], capture_output=True,
                              text=True, env={**env, "COLUMNS": "120"}, timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.slow
def test_deployed_but_not_loaded_says_load_it_then_load_and_infer(live, optiserve_home):
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    rows = json.dumps(x.tolist())
    # stored by the CLI while the server runs: this server has not loaded it
    assert cli("deploy", "lin", home=optiserve_home).returncode == 0
    proc = remote(live, "infer", "lin", rows)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "is stored but this server has not loaded it" in line
    assert "POST /v2/repository/models/lin/load" in line and "optiserve load lin" in line
    assert "Deploy one with" not in line

    loaded = remote(live, "load", "lin")
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded lin versions 1 in {live.url}" in loaded.stderr

    proc = remote(live, "infer", "lin", rows, "--json", env_vars=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["model_name"], out["model_version"]) == ("lin", "1")
    np.testing.assert_allclose(out["outputs"]["y"], lin_outputs(x), rtol=1e-5, atol=1e-5)
    # the same through a V2 request body, pinned to version 1
    body = json.dumps({"inputs": [{"name": "x", "shape": [5, 4], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})
    proc = remote(live, "infer", "lin:1", body, "--json")
    np.testing.assert_allclose(json.loads(proc.stdout)["outputs"]["y"], lin_outputs(x),
                               rtol=1e-5, atol=1e-5)
    # the server checks the rows: its message, one line
    bad = remote(live, "infer", "lin", "[[1, 2, 3]]")
    assert bad.returncode == 2 and "Input 'x'" in one_line_error(bad)


@pytest.mark.slow
def test_a_name_neither_served_nor_deployed_says_deploy_and_load(live):
    proc = remote(live, "infer", "nothing", "[[1, 2, 3, 4]]")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "No model 'nothing' is served here" in line
    assert "Deploy and load it here: POST /v2/repository/models/nothing/load" in line


@pytest.mark.slow
def test_remote_models_list_show_delete(live):
    listed = remote(live, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"model": "lin", "versions": 1, "latest": 1}]
    shown = remote(live, "models", "show", "lin")
    assert shown.returncode == 0 and "v1: inputs [x:float32[-1, 4]]" in shown.stdout
    deleted = remote(live, "models", "delete", "lin", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted model lin (1 version(s))" in deleted.stderr
    assert live.registry.models() == []
    empty = remote(live, "models", "list")
    assert empty.returncode == 0 and f"no models in server {live.url}" in empty.stderr
    gone = remote(live, "models", "delete", "lin", "--yes")
    assert gone.returncode == 2 and "No model 'lin'" in one_line_error(gone)


@pytest.mark.slow
def test_remote_runs_list_show_watch_cancel(live):
    queued = live.registry.runs.create("lin", {"model_id": "lin:1"}, status="queued")
    listed = json.loads(remote(live, "runs", "list", "--json").stdout)
    assert [(j["optimization_id"], j["status"]) for j in listed] == [(queued, "queued")]
    table = remote(live, "runs", "list", "--model", "lin")
    assert table.returncode == 0 and queued in table.stdout
    shown = remote(live, "runs", "show", queued, "--json")
    assert json.loads(shown.stdout)["status"] == "queued"
    cancelled = remote(live, "runs", "cancel", queued)
    assert cancelled.returncode == 0 and f"{queued}: cancelled" in cancelled.stderr
    assert live.registry.runs.get(queued)["status"] == "cancelled"
    watched = remote(live, "runs", "watch", queued, "--json")
    assert watched.returncode == 1 and json.loads(watched.stdout)["status"] == "cancelled"
    missing = remote(live, "runs", "show", "opt-000000000000")
    assert missing.returncode == 2 and "No optimization run" in one_line_error(missing)


@pytest.mark.slow
def test_remote_key_mistakes_are_one_line(live):
    none = remote(live, "models", "list", key=None)
    assert none.returncode == 2
    assert "--key or OPTISERVE_API_KEY" in one_line_error(none)
    reader = live.key("read")
    denied = remote(live, "models", "delete", "lin", "--yes", key=reader)
    assert denied.returncode == 2 and "models:write" in one_line_error(denied)
    down = cli("models", "list", "--server", f"http://127.0.0.1:{free_port()}",
               home=live.settings.home)
    assert down.returncode == 2 and "Cannot reach the server" in one_line_error(down)


@pytest.mark.slow
def test_serve_logs_each_deployment_and_a_ready_line(tmp_path, optiserve_home, sqlite_registry):
    register("lin", save_onnx(linear_onnx(4, 2), tmp_path / "lin.onnx"),
             registry=sqlite_registry)
    assert cli("deploy", "lin", "--instances", "2", "--threads", "1",
               home=optiserve_home).returncode == 0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTISERVE_")}
    env.update(OPTISERVE_HOME=str(optiserve_home), COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "optiserve", "serve", "--port", str(port),
                             "--grpc-port", "0", "--no-jobs"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any("ready:" in ln for ln in lines):
            if sel.select(timeout=1):
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = "".join(lines)
    assert "serving lin: lin v1 (onnxruntime, 2 instances x 1 threads, max batch 64)" in log, log
    ready = next(ln for ln in lines if "ready:" in ln)
    assert "INFO" in ready and "1 deployment served" in ready
    assert f"http://127.0.0.1:{port}" in ready and "no optimization jobs" in ready
