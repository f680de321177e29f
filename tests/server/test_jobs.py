"""Optimization jobs over HTTP: the seed's request verbatim, queued jobs, progress, cancel,
timeouts, two jobs on one model, and a server killed mid-job then restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from optiserve.optimizer.request import SEED_REQUEST  # the seed document's body, verbatim
from tests.server.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def churn_pipeline():
    """Scaler + logistic regression on the demo source's synthetic churn rows it never
    validates on (the seed's query reads the first 1000)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from optiserve.data import demo_source

    data = demo_source.generate()
    x = np.column_stack([data[f] for f in demo_source.FEATURES])[1000:]
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(
        x, data[demo_source.LABEL][1000:])


def _register(live, pipeline, tmp_path, name="model-xyz789"):
    import joblib

    from optiserve.api import register

    path = tmp_path / f"{name}.pkl"
    joblib.dump(pipeline, path)
    return register(name, path, registry=live.registry, label_column="churned")


def _slow(model_id: str) -> dict:
    """A request whose first measurement takes about 10 s (the optimizer's timing cap)."""
    return {"model_id": model_id, "optimizations": ["onnx_conversion"],
            "iterations": 100_000, "warmup": 0}


def _wait_running(client, run_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/inference/optimizations/{run_id}").json()
        if job["status"] == "running" and (job["progress"]["stage"] or "").startswith("measur"):
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"{run_id} never started measuring")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_seed_request_verbatim_completes_with_every_field_measured(
        make_server, churn_pipeline, tmp_path, backend, request):
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    live = make_server(database_url=url)
    _register(live, churn_pipeline, tmp_path)
    c = live.client()

    r = c.post("/api/v1/inference/optimize", json=SEED_REQUEST)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["status"] == "queued" and queued["model_id"] == "model-xyz789:1"
    job = live.wait(queued["optimization_id"])
    assert job["status"] == "completed", job["error"]

    report = job["report"]
    assert set(report) == {"optimization_id", "status", "original", "optimized", "improvement",
                           "artifact_id"}
    assert report["optimization_id"] == queued["optimization_id"]
    assert report["original"]["format"] == "pkl" and report["optimized"]["format"] == "onnx"
    for side in ("original", "optimized"):
        assert set(report[side]) == {"format", "size_mb", "latency_ms", "accuracy"}
        assert report[side]["size_mb"] > 0 and report[side]["latency_ms"] > 0
        # labels recorded with the model: real accuracy on the 1000 rows, not agreement
        assert 0.6 < report[side]["accuracy"] < 1.0
    assert job["details"]["metric"] == "accuracy"
    assert "recorded with the model" in job["details"]["dataset"]
    for key in ("size_reduction", "latency_reduction", "accuracy_change"):
        assert isinstance(report["improvement"][key], str) and report["improvement"][key]
    assert report["artifact_id"] == "model-xyz789-v2"
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["candidates_measured"] >= 1
    assert all({"label", "runtime", "latency", "gate"} <= set(c) for c in job["candidates"])
    # the artifact is downloadable and is what the registry holds
    d = c.get(f"/api/v1/artifacts/{report['artifact_id']}")
    assert d.status_code == 200 and d.headers["x-checksum-sha256"]


@pytest.mark.slow
def test_wait_true_answers_exactly_the_seed_response(server, churn_pipeline, tmp_path):
    _register(server, churn_pipeline, tmp_path)
    r = server.client().post("/api/v1/inference/optimize?wait=true", json=SEED_REQUEST)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"optimization_id", "status", "original", "optimized", "improvement",
                         "artifact_id"}
    assert body["status"] == "completed"
    assert server.registry.runs.get(body["optimization_id"])["status"] == "completed"


@pytest.mark.slow
def test_cancel_running_and_queued_jobs(server, churn_pipeline, tmp_path):
    _register(server, churn_pipeline, tmp_path, "m")
    c = server.client()
    first = c.post("/api/v1/inference/optimize", json=_slow("m")).json()["optimization_id"]
    second = c.post("/api/v1/inference/optimize", json=_slow("m")).json()["optimization_id"]
    _wait_running(c, first)
    assert c.get(f"/api/v1/inference/optimizations/{second}").json()["status"] == "queued"

    # a queued job is cancelled at once; its model is still in use by the running one
    r = c.delete(f"/api/v1/inference/optimizations/{second}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert c.delete("/api/v1/models/m").status_code == 409

    t0 = time.monotonic()
    r = c.delete(f"/api/v1/inference/optimizations/{first}")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "cancelled" and time.monotonic() - t0 < 5
    assert "Cancelled by request, during: measuring" in job["error"]
    # ended jobs cannot be cancelled again; waiting on a cancelled job is a clear 409
    r = c.delete(f"/api/v1/inference/optimizations/{first}")
    assert r.status_code == 409 and "already ended (cancelled)" in r.json()["error"]
    assert [v.version for v in server.registry.versions("m")] == [1]  # nothing half-made
    assert c.delete("/api/v1/models/m").status_code == 200


@pytest.mark.slow
def test_job_past_the_time_limit_is_killed_and_marked_timeout(make_server, churn_pipeline,
                                                               tmp_path):
    # 0.05 s of optimization time and no grace: the supervisor stops the job during start-up
    live = make_server(optimization_max_time_minutes=0.05 / 60, job_grace_s=0)
    _register(live, churn_pipeline, tmp_path, "m")
    r = live.client().post("/api/v1/inference/optimize?wait=true", json=_slow("m"))
    assert r.status_code == 408, r.text
    body = r.json()
    assert body["status"] == "timeout" and "OPTIMIZATION_MAX_TIME_MINUTES" in body["error"]
    job = live.client().get(f"/api/v1/inference/optimizations/{body['optimization_id']}").json()
    assert job["status"] == "timeout" and job["finished_at"]
    assert [v.version for v in live.registry.versions("m")] == [1]


@pytest.mark.slow
def test_two_jobs_on_one_model_at_once(make_server, churn_pipeline, tmp_path):
    live = make_server(job_workers=2)
    _register(live, churn_pipeline, tmp_path, "m")
    c = live.client()
    body = {**SEED_REQUEST, "model_id": "m", "iterations": 50, "warmup": 5}
    ids = [c.post("/api/v1/inference/optimize", json=body).json()["optimization_id"]
           for _ in range(2)]
    jobs = [live.wait(i) for i in ids]
    assert [j["status"] for j in jobs] == ["completed", "completed"], [j["error"] for j in jobs]
    made = sorted(int(j["report"]["artifact_id"].rsplit("-v", 1)[1]) for j in jobs)
    versions = live.registry.versions("m")
    assert made == [v.version for v in versions if v.parent == 1]
    for v in versions[1:]:
        assert live.registry.path(v).is_file()


@pytest.mark.slow
def test_killed_server_marks_its_job_failed_on_restart(settings, churn_pipeline, tmp_path):
    from optiserve.registry import Registry

    registry = Registry(settings)
    token = registry.keys.create("t", ["admin"])[1]
    import httpx

    from optiserve.api import register
    import joblib

    joblib.dump(churn_pipeline, tmp_path / "m.pkl")
    register("m", tmp_path / "m.pkl", registry=registry)
    env = {**os.environ, **settings.environment()}

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "optiserve", "serve", "--port", str(port),
                                 "--log-level", "warning"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
        deadline = time.monotonic() + 120  # a loaded CI machine starts Python slowly
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.get("/api/v1/health").status_code == 200:
                    return proc, client
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        proc.kill()
        raise AssertionError(f"server did not start (exit code {proc.poll()})")

    proc, client = start()
    try:
        run_id = client.post("/api/v1/inference/optimize",
                             json=_slow("m")).json()["optimization_id"]
        _wait_running(client, run_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The worker dies with its server (PR_SET_PDEATHSIG): wait for that, not for a time.
        deadline = time.monotonic() + 30
        while subprocess.run(["pgrep", "-f", f"optiserve.jobs.worker {run_id}"],
                             capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "the worker outlived its server by 30 s"
            time.sleep(0.1)
        assert registry.runs.get(run_id)["status"] == "running"  # until someone looks
    finally:
        client.close()
    proc, client = start()
    try:
        job = client.get(f"/api/v1/inference/optimizations/{run_id}").json()
        assert job["status"] == "failed"
        assert job["error"].startswith("Interrupted: the process that ran it")
        assert "Submit the optimization again" in job["error"]
        assert [v.version for v in registry.versions("m")] == [1]
        leftovers = [p for p in registry.store.root.rglob(".tmp-*")]
        assert leftovers == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        client.close()
        registry.close()
