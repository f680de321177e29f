"""Models over HTTP: upload (ONNX, TorchScript, skops; never pickles), list, show, download,
delete — with the real server and httpx."""

from __future__ import annotations

import hashlib
import io

import onnx
import pytest

from tests.builders import linear_onnx, mlp_onnx


def _onnx_bytes(model=None) -> bytes:
    return (model or linear_onnx()).SerializeToString()


def upload(client, name: str, data: bytes, filename: str = "model.onnx", **form):
    return client.post("/api/v1/models", data={"name": name, **form},
                       files={"file": (filename, io.BytesIO(data), "application/octet-stream")})


def test_register_show_download_and_delete(server):
    c = server.client()
    r = upload(c, "lin", _onnx_bytes())
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["ref"], v["format"], v["framework"], v["status"]) == ("lin:1", "onnx", "onnx", "ready")
    assert v["signature"]["inputs"][0]["name"] == "x"
    assert upload(c, "lin", _onnx_bytes(mlp_onnx((4, 8, 3)))).json()["version"] == 2

    listed = c.get("/api/v1/models").json()["models"]
    assert [(m["name"], m["versions"], m["latest"]["version"]) for m in listed] == [("lin", 2, 2)]
    shown = c.get("/api/v1/models/lin").json()
    assert [x["version"] for x in shown["versions"]] == [1, 2] and shown["latest"] == 2
    assert shown["versions"][0]["lineage"] == {"parent": None, "passes": []}

    d = c.get(f"/api/v1/artifacts/{v['artifact_id']}")
    assert d.status_code == 200
    assert hashlib.sha256(d.content).hexdigest() == d.headers["x-checksum-sha256"] == v["sha256"]
    assert int(d.headers["x-artifact-size"]) == len(d.content) == v["size_bytes"]
    onnx.checker.check_model(onnx.load_from_string(d.content))

    gone = c.delete("/api/v1/models/lin")
    assert gone.status_code == 200 and gone.json() == {"deleted": "lin", "versions": 2}
    assert c.get("/api/v1/models/lin").status_code == 404
    assert c.get(f"/api/v1/artifacts/{v['artifact_id']}").status_code == 404
    assert not any(server.registry.store.root.rglob("*.onnx"))  # the files went too


def test_pickle_upload_is_refused_and_nothing_is_stored(server, logreg, tmp_path):
    import joblib

    path = tmp_path / "m.pkl"
    joblib.dump(logreg, path)
    c = server.client()
    for filename in ("m.pkl", "model.onnx", "m.skops"):  # whatever the name claims
        r = upload(c, "churn", path.read_bytes(), filename)
        assert r.status_code in (400, 415), r.text
        assert "pickle" in r.json()["error"].lower()
    assert upload(c, "churn", path.read_bytes(), "m.pkl").status_code == 415
    assert server.registry.models() == []


def test_corrupted_onnx_upload_is_400_and_nothing_is_stored(server):
    data = _onnx_bytes()
    r = upload(server.client(), "bad", data[: len(data) // 2])
    assert r.status_code == 400
    assert "cannot load model" in r.json()["error"].lower()
    assert server.registry.models() == []
    assert not any(p.is_file() for p in server.registry.store.root.rglob("*"))


def test_oversized_upload_is_413_before_it_is_stored(make_server):
    live = make_server(max_upload_mb=0.001)  # 1 kB
    r = upload(live.client(), "big", _onnx_bytes(mlp_onnx((64, 128, 10))))
    assert r.status_code == 413
    assert "OPTISERVE_MAX_UPLOAD_MB" in r.json()["error"]
    assert live.registry.models() == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../etc", "a b", "-x"])
def test_bad_model_name_is_400(server, name):
    r = upload(server.client(), name, _onnx_bytes())
    assert r.status_code == 400 and "not allowed" in r.json()["error"]


def test_unknown_model_and_artifact_are_404(server):
    c = server.client()
    for path in ("/api/v1/models/nope", "/api/v1/artifacts/nope-v1"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["error"]
    assert c.delete("/api/v1/models/nope").status_code == 404


@pytest.mark.slow
@pytest.mark.integration
def test_skops_upload_then_optimize_over_http(server, logreg, breast_cancer, tmp_path):
    import skops.io

    import numpy as np

    skops.io.dump(logreg, tmp_path / "m.skops")
    c = server.client()
    r = upload(c, "cancer", (tmp_path / "m.skops").read_bytes(), "m.skops")
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["framework"]) == ("skops", "sklearn")
    folder = server.settings.data_folder
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "cancer.npz", input=breast_cancer.X_val, label=breast_cancer.y_val)
    body = {"model_id": "cancer", "optimizations": ["onnx_conversion"], "iterations": 20,
            "warmup": 2, "validation_dataset": {"source": "file", "path": "cancer.npz",
                                                "label_column": "label"}}
    done = c.post("/api/v1/inference/optimize?wait=true", json=body)
    assert done.status_code == 200, done.text
    report = done.json()
    assert report["original"]["format"] == "skops" and report["optimized"]["format"] == "onnx"
    assert report["optimized"]["accuracy"] >= 0.99 * report["original"]["accuracy"]

    # the run's Pareto chart is served under the run, and the job names its URL, not a path
    job = c.get(f"/api/v1/inference/optimizations/{report['optimization_id']}").json()
    url = f"/api/v1/inference/optimizations/{report['optimization_id']}/pareto.png"
    assert job["details"]["pareto_png"] == url
    png = c.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    missing = c.get("/api/v1/inference/optimizations/opt-000000000000/pareto.png")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.integration
def test_torchscript_upload_with_input_specs(server, digits_net, tmp_path):
    import torch

    torch.jit.save(torch.jit.trace(digits_net, torch.zeros(2, 64)), tmp_path / "net.pt")
    c = server.client()
    data = (tmp_path / "net.pt").read_bytes()
    r = upload(c, "net", data, "net.pt", inputs=["x:float32[-1,64]"])
    assert r.status_code == 201, r.text
    assert r.json()["signature"]["inputs"] == [{"name": "x", "dtype": "float32",
                                                "shape": [-1, 64]}]
    missing = upload(c, "net", data, "net.pt")
    assert missing.status_code == 400 and "input" in missing.json()["error"].lower()


@pytest.mark.slow
def test_benchmark_endpoint_gives_the_seed_shape(server):
    c = server.client()
    assert upload(c, "lin", _onnx_bytes()).status_code == 201
    r = c.post("/api/v1/inference/benchmark", json={
        "model_id": "lin", "iterations": 30, "warmup_iterations": 3, "batch_sizes": [1, 8]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_id"], body["version"], body["runtime"]) == ("lin", 1, "onnxruntime")
    bench = body["benchmark"]
    assert (bench["iterations"], bench["warmup_iterations"], bench["batch_sizes"]) == (30, 3, [1, 8])
    for key in ("batch_1", "batch_8"):
        row = bench["results"][key]
        assert row["runs"] == 30
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput"] > 0


def test_health_version_and_openapi(server):
    c = server.client()
    assert c.get("/api/v1/health").json()["database"] == "sqlite"
    v = c.get("/api/v1/version").json()
    assert v["api"] == "v1" and v["optiserve"]
    spec = c.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/v1/models", "/api/v1/models/{model_id}", "/api/v1/artifacts/{artifact_id}",
            "/api/v1/inference/optimize", "/api/v1/inference/optimizations/{optimization_id}",
            "/api/v1/inference/benchmark", "/api/v1/health", "/api/v1/version"} <= paths
    body = spec["components"]["schemas"]["OptimizeRequest"]["properties"]
    assert {"model_id", "optimizations", "quantization_config", "validation_dataset",
            "accuracy_threshold"} <= set(body)
    assert c.get("/docs").status_code == 200


@pytest.mark.integration
def test_torch_export_upload_is_refused_it_can_carry_pickles(server, tmp_path):
    import torch

    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2

    torch.export.save(torch.export.export(Twice(), (torch.zeros(2, 3),)), tmp_path / "m.pt2")
    r = upload(server.client(), "m", (tmp_path / "m.pt2").read_bytes(), "m.pt2")
    assert r.status_code == 415
    assert "torch.export" in r.json()["error"] and "ONNX" in r.json()["error"]
    assert server.registry.models() == []


@pytest.mark.integration
def test_native_tree_files_are_refused_over_the_network(server, tmp_path, breast_cancer):
    xgboost = pytest.importorskip("xgboost")
    lightgbm = pytest.importorskip("lightgbm")
    x, y = breast_cancer.X_val, breast_cancer.y_val
    xgboost.XGBClassifier(n_estimators=3).fit(x, y).save_model(tmp_path / "m.json")
    lightgbm.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y).booster_.save_model(
        tmp_path / "m.txt")
    for name in ("m.json", "m.txt"):
        r = upload(server.client(), "trees", (tmp_path / name).read_bytes(), name)
        assert r.status_code == 415, r.text
        assert "crash" in r.json()["error"] and "ONNX" in r.json()["error"]
    assert server.registry.models() == []


@pytest.mark.slow
@pytest.mark.integration
def test_savedmodel_is_refused_and_keras_file_accepted_over_the_network(server, tmp_path):
    keras = pytest.importorskip("keras")
    from optiserve.convert.tensorflow import zip_savedmodel

    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.export(tmp_path / "sm", verbose=False)
    zipped = zip_savedmodel(tmp_path / "sm", tmp_path / "sm.zip")
    r = upload(server.client(), "tf", zipped.read_bytes(), "sm.zip")
    assert r.status_code == 415, r.text
    assert "SavedModel" in r.json()["error"] and ".keras" in r.json()["error"]
    assert server.registry.models() == []
    model.save(tmp_path / "m.keras")
    r = upload(server.client(), "tf", (tmp_path / "m.keras").read_bytes(), "m.keras")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "keras"


def test_oversized_chunked_upload_without_length_is_413(make_server):
    live = make_server(max_upload_mb=0.001)  # 1 kB

    def chunks():
        yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(64):
            yield b"x" * 1024

    r = live.client().post("/api/v1/models", content=chunks(),
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "OPTISERVE_MAX_UPLOAD_MB" in r.json()["error"]
    assert live.registry.models() == []
