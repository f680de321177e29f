"""API keys: 401 without or with a wrong/revoked key, 403 without the scope, health open,
OPTISERVE_AUTH=off only when asked."""

from __future__ import annotations

import pytest

from tests.builders import linear_onnx
from tests.server.test_models import upload


def test_health_needs_no_key_everything_else_does(server):
    anon = server.client(token=None)
    health = anon.get("/api/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for method, path in [("GET", "/api/v1/version"), ("GET", "/api/v1/models"),
                         ("GET", "/api/v1/models/x"), ("DELETE", "/api/v1/models/x"),
                         ("GET", "/api/v1/artifacts/x-v1"),
                         ("POST", "/api/v1/inference/optimize"),
                         ("POST", "/api/v1/inference/benchmark"),
                         ("GET", "/api/v1/inference/optimizations"),
                         ("GET", "/api/v1/inference/optimizations/opt-1"),
                         ("DELETE", "/api/v1/inference/optimizations/opt-1")]:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code)
        assert "needs an API key" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.slow
@pytest.mark.parametrize("token", ["osk_nope_nope", "garbage", "osk_"])
def test_wrong_key_is_401(server, token):
    r = server.client(token=token).get("/api/v1/models")
    assert r.status_code == 401 and "not valid" in r.json()["error"]


def test_x_api_key_header_works_too(server):
    r = server.client(token=None, headers={"X-API-Key": server.admin}).get("/api/v1/models")
    assert r.status_code == 200


@pytest.mark.slow
def test_scopes(server):
    reader = server.client(server.key("read"))
    writer = server.client(server.key("models:write"))
    optimizer = server.client(server.key("optimize"))
    onnx_bytes = linear_onnx().SerializeToString()

    r = upload(reader, "m", onnx_bytes)
    assert r.status_code == 403 and "models:write" in r.json()["error"]
    assert server.registry.models() == []
    assert upload(writer, "m", onnx_bytes).status_code == 201
    assert reader.get("/api/v1/models/m").status_code == 200
    assert writer.get("/api/v1/models/m").status_code == 403
    assert reader.post("/api/v1/inference/optimize", json={"model_id": "m"}).status_code == 403
    run = optimizer.post("/api/v1/inference/optimize", json={
        "model_id": "m", "optimizations": ["graph_optimization"], "iterations": 5, "warmup": 1})
    assert run.status_code == 202
    run_id = run.json()["optimization_id"]
    # optimize may follow its own jobs; read may look at them; neither may delete models
    assert optimizer.get(f"/api/v1/inference/optimizations/{run_id}").status_code == 200
    assert reader.get(f"/api/v1/inference/optimizations/{run_id}").status_code == 200
    assert optimizer.delete("/api/v1/models/m").status_code == 403
    server.wait(run_id)


def test_revoked_key_is_401(server):
    token = server.key("read")
    c = server.client(token)
    assert c.get("/api/v1/models").status_code == 200
    key_id = token.split("_")[1]
    server.registry.keys.revoke(key_id)
    r = c.get("/api/v1/models")
    assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_keys_are_stored_hashed(server):
    token = server.key("read")
    from sqlalchemy import text

    with server.registry.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).fetchall()
    assert rows and not any(token.split("_", 2)[2] in str(row) for row in rows)


def test_auth_off_only_when_asked(make_server):
    live = make_server(auth="off")
    assert live.client(token=None).get("/api/v1/models").status_code == 200


@pytest.mark.slow
def test_serve_warns_loudly_when_auth_is_off_on_a_public_address(optiserve_home):
    import os
    import subprocess
    import sys

    from tests.server.conftest import free_port

    env = {**os.environ, "OPTISERVE_AUTH": "off", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "optiserve", "serve", "--host", "0.0.0.0",
                             "--port", str(free_port()), "--log-level", "warning"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "WARNING: OPTISERVE_AUTH=off" in first and "0.0.0.0" in first
    assert "anyone who can reach it" in first
