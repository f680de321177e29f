"""The Open Inference Protocol over REST, against a real server on a loopback port, driven by the
unchanged `tritonclient.http` and by plain httpx: health and metadata, inference checked
against ONNX Runtime in-process for every datatype (JSON and binary), the repository,
configuration and statistics extensions, /metrics, concurrency and batching, versions and hot
reload, the deployments API and API keys."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as tc
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from optiserve.api import register
from tests.builders import IR_VERSION, OPSET, linear_onnx, mlp_onnx, run_onnx, save_onnx
from tests.server.test_batching import rowsum_onnx


def _model(nodes, inputs, outputs, name="m") -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def fp16_onnx() -> onnx.ModelProto:
    """h [N, 3] FP16 -> y = h + h (FP16)."""
    return _model([helper.make_node("Add", ["h", "h"], ["y"])], [
        helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 3])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 3])])


def types_onnx() -> onnx.ModelProto:
    """i INT64 [N, 2] -> i2 = i + i; b BOOL [N, 2] -> nb = not b; s STRING [N] -> so = s;
    u UINT8 [N, 2] -> uo = u."""
    def vi(name: str, kind: int, *dims: int):
        return helper.make_tensor_value_info(name, kind, ["batch", *dims])

    T = TensorProto
    return _model([helper.make_node("Add", ["i", "i"], ["i2"]),
                   helper.make_node("Not", ["b"], ["nb"]),
                   helper.make_node("Identity", ["s"], ["so"]),
                   helper.make_node("Identity", ["u"], ["uo"])],
                  [vi("i", T.INT64, 2), vi("b", T.BOOL, 2), vi("s", T.STRING), vi("u", T.UINT8, 2)],
                  [vi("i2", T.INT64, 2), vi("nb", T.BOOL, 2), vi("so", T.STRING),
                   vi("uo", T.UINT8, 2)])


class Served:
    """A live server (no job runner) and helpers to register, deploy and call models."""

    def __init__(self, live, tmp_path):
        self.live, self.tmp = live, tmp_path
        self.http = live.client()
        self.triton = tc.InferenceServerClient(live.url.removeprefix("http://"))
        self.files: dict[tuple[str, int], object] = {}

    def headers(self, token: str | None = "admin") -> dict:
        """A fresh dict each call: tritonclient adds to the one it is given."""
        token = self.live.admin if token == "admin" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def register(self, name: str, model: onnx.ModelProto) -> int:
        n = sum(1 for k in self.files if k[0] == name) + 1
        path = save_onnx(model, self.tmp / f"{name}-{n}.onnx")
        info = register(name, path, registry=self.live.registry)
        self.files[(name, info.version)] = path
        return info.version

    def deploy(self, name: str, **spec) -> dict:
        r = self.http.put(f"/api/v1/deployments/{name}", json=spec)
        assert r.status_code == 200, r.text
        return r.json()

    def expected(self, name: str, feed: dict, version: int = 1) -> list[np.ndarray]:
        return run_onnx(self.files[(name, version)], feed)

    def infer_json(self, name: str, x: np.ndarray, version: str | None = None, **extra):
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        return self.http.post(path, json={"inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32",
             "data": x.tolist()}], **extra})

    def stats(self, name: str, version: str = "") -> dict:
        stats = self.triton.get_inference_statistics(name, version, headers=self.headers())
        return stats["model_stats"]

    def metrics(self) -> dict:
        """{(sample name, frozenset(labels)): value}"""
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}


@pytest.fixture
def served(make_server, tmp_path):
    s = Served(make_server(jobs=False), tmp_path)
    yield s
    s.triton.close()


@pytest.fixture
def lin(served) -> Served:
    """'lin' (4 -> 3 linear) registered and deployed with max_batch_size 8."""
    served.register("lin", linear_onnx(4, 3))
    served.deploy("lin", max_batch_size=8)
    return served


def _x(n: int, seed: int = 0, width: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _triton_infer(s: Served, name: str, feed: dict, *, binary: bool = True, outputs=None,
                  **kw):
    inputs = []
    for n, array in feed.items():
        dt = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "bool": "BOOL",
              "object": "BYTES", "uint8": "UINT8", "float64": "FP64"}[array.dtype.name]
        i = tc.InferInput(n, list(array.shape), dt)
        i.set_data_from_numpy(array, binary_data=binary)
        inputs.append(i)
    outs = [tc.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return s.triton.infer(name, inputs, outputs=outs, headers=s.headers(), **kw)


# -- health and metadata ----------------------------------------------------------------------
def test_health_and_server_metadata(lin):
    anon = lin.live.client(token=None)
    assert anon.get("/v2/health/live").json() == {"live": True}
    assert anon.get("/v2/health/ready").json() == {"ready": True}
    assert lin.triton.is_server_live() and lin.triton.is_server_ready()
    meta = lin.triton.get_server_metadata(headers=lin.headers())
    assert meta["name"] == "optiserve"
    assert {"binary_tensor_data", "model_repository", "model_configuration",
            "statistics"} <= set(meta["extensions"])


def test_model_metadata_ready_and_config(lin):
    meta = lin.triton.get_model_metadata("lin", headers=lin.headers())
    assert meta["name"] == "lin" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert lin.triton.get_model_metadata("lin", "1", headers=lin.headers())["versions"] == ["1"]
    assert lin.triton.is_model_ready("lin", headers=lin.headers())
    assert lin.triton.is_model_ready("lin", "1", headers=lin.headers())
    assert not lin.triton.is_model_ready("lin", "2", headers=lin.headers())
    assert not lin.triton.is_model_ready("ghost", headers=lin.headers())

    config = lin.triton.get_model_config("lin", headers=lin.headers())
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


def test_unbatched_config_keeps_the_full_dims(served):
    served.register("lin", linear_onnx(4, 3))
    served.deploy("lin", max_batch_size=0)
    config = served.triton.get_model_config("lin", headers=served.headers())
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"][0]["dims"] == [-1, 4]
    x = _x(5)
    got = _triton_infer(served, "lin", {"x": x}).as_numpy("y")
    np.testing.assert_allclose(got, served.expected("lin", {"x": x})[0], rtol=1e-5, atol=1e-6)

    # a model without a dynamic batch dimension is served unbatched whatever was asked
    served.register("fixed", _model([helper.make_node("Relu", ["x"], ["y"])], [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    served.deploy("fixed", max_batch_size=32)
    config = served.triton.get_model_config("fixed", headers=served.headers())
    assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [1, 4]
    got = _triton_infer(served, "fixed", {"x": x[:1]}).as_numpy("y")
    np.testing.assert_array_equal(got, np.maximum(x[:1], 0))
    r = served.infer_json("fixed", x[:2])
    assert r.status_code == 400 and "the model expects [1, 4]" in r.json()["error"]


def test_a_deployment_that_fails_at_startup_is_unavailable_until_fixed(
        make_server, sqlite_registry, tmp_path):
    from optiserve.registry.deployments import parse_spec

    v1 = register("m", save_onnx(linear_onnx(4, 3), tmp_path / "m1.onnx"),
                  registry=sqlite_registry)
    register("ok", save_onnx(linear_onnx(4, 2), tmp_path / "ok.onnx"), registry=sqlite_registry)
    sqlite_registry.deployments.put("m", parse_spec({"model": "m"}))
    sqlite_registry.deployments.put("ok", parse_spec({"model": "ok"}))
    sqlite_registry.path(v1).write_bytes(b"not onnx any more")  # the stored file went bad

    s = Served(make_server(jobs=False), tmp_path)  # the server starts all the same
    try:
        r = s.live.client(token=None).get("/v2/health/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        index = {e["name"]: e for e in s.http.post("/v2/repository/index").json()}
        assert index["ok"]["state"] == "READY"
        assert index["m"]["state"] == "UNAVAILABLE"
        assert "last load failed" in index["m"]["reason"]
        assert _triton_infer(s, "ok", {"x": _x(1)}).as_numpy("y").shape == (1, 2)
        r = s.infer_json("m", _x(1))
        assert r.status_code == 503 and "unavailable" in r.json()["error"]
        assert not s.triton.is_model_ready("m", headers=s.headers())
        assert s.http.get("/api/v1/deployments/m").json()["state"] == "UNAVAILABLE"

        s.files[("m", 2)] = save_onnx(linear_onnx(4, 3, seed=5), tmp_path / "m2.onnx")
        register("m", s.files[("m", 2)], registry=s.live.registry)
        s.triton.load_model("m", headers=s.headers())
        assert s.live.client(token=None).get("/v2/health/ready").status_code == 200
        assert _version_of(s, "m", _x(2)) == "2"
    finally:
        s.triton.close()


# -- inference --------------------------------------------------------------------------------
def test_infer_equals_onnxruntime(lin):
    for binary in (True, False):
        x = _x(5, seed=int(binary))
        result = _triton_infer(lin, "lin", {"x": x}, binary=binary, outputs=["y"],
                               request_id=f"req-{binary}")
        got = result.as_numpy("y")
        assert got.dtype == np.float32 and got.shape == (5, 3)
        np.testing.assert_allclose(got, lin.expected("lin", {"x": x})[0], rtol=1e-5, atol=1e-6)
        response = result.get_response()
        assert response["id"] == f"req-{binary}"
        assert (response["model_name"], response["model_version"]) == ("lin", "1")
    assert "id" not in _triton_infer(lin, "lin", {"x": x}).get_response()


def test_plain_json_nested_and_flat_and_binary_output(lin):
    x = _x(3, seed=2)
    want = lin.expected("lin", {"x": x})[0]
    for data in (x.tolist(), x.reshape(-1).tolist()):
        r = lin.http.post("/v2/models/lin/infer", json={"id": "abc", "inputs": [
            {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": data}]})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["id"] == "abc" and body["model_version"] == "1"
        [out] = body["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [3, 3])
        np.testing.assert_allclose(np.array(out["data"]).reshape(3, 3), want, rtol=1e-5,
                                   atol=1e-6)

    # the binary_data_output parameter: every output as raw bytes after the JSON header
    x = _x(2, seed=3)
    r = lin.http.post("/v2/models/lin/infer", json={
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}],
        "parameters": {"binary_data_output": True}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    [out] = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 2 * 3 * 4 == len(r.content) - n
    got = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(got, lin.expected("lin", {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_requested_output_subset_and_mixed_binary(served):
    served.register("rs", rowsum_onnx())
    served.deploy("rs")
    x = _x(3, seed=4, width=5)
    s_want, d_want = served.expected("rs", {"x": x})
    only_s = _triton_infer(served, "rs", {"x": x}, outputs=["s"])
    assert [o["name"] for o in only_s.get_response()["outputs"]] == ["s"]
    assert only_s.as_numpy("d") is None
    np.testing.assert_allclose(only_s.as_numpy("s"), s_want, rtol=1e-5)
    # one output as JSON, the other binary, in the order asked
    inp = tc.InferInput("x", [3, 5], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    both = served.triton.infer("rs", [inp], headers=served.headers(), outputs=[
        tc.InferRequestedOutput("d", binary_data=True),
        tc.InferRequestedOutput("s", binary_data=False)])
    assert [o["name"] for o in both.get_response()["outputs"]] == ["d", "s"]
    np.testing.assert_array_equal(both.as_numpy("d"), d_want)
    np.testing.assert_allclose(both.as_numpy("s"), s_want, rtol=1e-5)
    # no outputs named: all of them
    everything = _triton_infer(served, "rs", {"x": x}, binary=False)
    assert {o["name"] for o in everything.get_response()["outputs"]} == {"s", "d"}


def test_gzip_request_body(lin):
    x = _x(8, seed=5)
    for binary in (True, False):
        got = _triton_infer(lin, "lin", {"x": x}, binary=binary,
                            request_compression_algorithm="gzip").as_numpy("y")
        np.testing.assert_allclose(got, lin.expected("lin", {"x": x})[0], rtol=1e-5, atol=1e-6)
    deflated = _triton_infer(lin, "lin", {"x": x}, request_compression_algorithm="deflate")
    np.testing.assert_allclose(deflated.as_numpy("y"), lin.expected("lin", {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_fp16(served):
    served.register("half", fp16_onnx())
    served.deploy("half")
    h = np.array([[0.5, -1.25, 65504 / 4], [1e-3, 0, 7]], dtype=np.float16)
    for binary in (True, False):
        result = _triton_infer(served, "half", {"h": h}, binary=binary, outputs=["y"])
        got = result.as_numpy("y")
        assert result.get_response()["outputs"][0]["datatype"] == "FP16"
        np.testing.assert_array_equal(got.astype(np.float16),
                                      served.expected("half", {"h": h})[0])


def test_int64_bool_uint8_and_bytes(served):
    served.register("types", types_onnx())
    served.deploy("types")
    for binary in (True, False):
        _check_types(served, binary)


def _check_types(served: Served, binary: bool) -> None:
    feed = {"i": np.array([[1, -2], [2**40, 0], [7, 8]], dtype=np.int64),
            "b": np.array([[True, False], [False, False], [True, True]]),
            "s": np.array([b"hello", b"", "h\u00e9".encode()], dtype=object),
            "u": np.array([[0, 255], [1, 2], [3, 4]], dtype=np.uint8)}
    result = _triton_infer(served, "types", feed, binary=binary,
                           outputs=["i2", "nb", "so", "uo"])
    dts = {o["name"]: o["datatype"] for o in result.get_response()["outputs"]}
    assert dts == {"i2": "INT64", "nb": "BOOL", "so": "BYTES", "uo": "UINT8"}
    np.testing.assert_array_equal(result.as_numpy("i2"), feed["i"] * 2)
    np.testing.assert_array_equal(result.as_numpy("nb"), ~feed["b"])
    np.testing.assert_array_equal(result.as_numpy("uo"), feed["u"])
    strings = result.as_numpy("so").reshape(-1)
    assert [x if isinstance(x, bytes) else x.encode() for x in strings] == list(feed["s"])


@pytest.mark.integration
def test_scikit_learn_model(served, logreg, breast_cancer):
    register("churn", logreg, registry=served.live.registry)
    served.deploy("churn", max_batch_size=16)
    meta = served.triton.get_model_metadata("churn", headers=served.headers())
    assert meta["platform"] == "sklearn" and meta["inputs"][0]["datatype"] == "FP64"
    name = meta["inputs"][0]["name"]
    x = breast_cancer.X_val[:10]
    inp = tc.InferInput(name, list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    result = served.triton.infer("churn", [inp], headers=served.headers())
    np.testing.assert_array_equal(result.as_numpy("label"), logreg.predict(x))
    np.testing.assert_allclose(result.as_numpy("probabilities"), logreg.predict_proba(x),
                               rtol=1e-12)


# -- statistics and metrics -------------------------------------------------------------------
def test_statistics_grow_with_inferences(lin):
    before = lin.stats("lin")
    assert [(s["name"], s["version"], s["inference_count"]) for s in before] == [("lin", "1", 0)]
    for n in (1, 3, 5):
        _triton_infer(lin, "lin", {"x": _x(n)})
    with pytest.raises(InferenceServerException, match="NaN"):  # refused: a failure
        _triton_infer(lin, "lin", {"x": np.full((2, 4), np.nan, np.float32)})
    [after] = lin.stats("lin")
    assert after["inference_count"] == 9  # rows, not requests
    assert 1 <= after["execution_count"] <= 3
    inf = after["inference_stats"]
    assert inf["success"]["count"] == 3 and inf["success"]["ns"] > 0
    assert inf["fail"]["count"] == 1
    assert inf["queue"]["count"] == inf["compute_infer"]["count"] == 3
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == \
        after["execution_count"]
    assert after["last_inference"] > 0
    assert lin.stats("lin", "1") == [after]
    with pytest.raises(InferenceServerException):
        lin.stats("lin", "9")


def test_statistics_of_every_model(lin):
    lin.register("other", linear_onnx(4, 2, seed=3))
    lin.deploy("other")
    _triton_infer(lin, "other", {"x": _x(2)})
    r = lin.http.get("/v2/models/stats")
    assert r.status_code == 200, r.text
    stats = {s["name"]: s for s in r.json()["model_stats"]}
    assert set(stats) == {"lin", "other"}
    assert stats["other"]["inference_count"] == 2 and stats["lin"]["inference_count"] == 0
    every = lin.triton.get_inference_statistics(headers=lin.headers())["model_stats"]
    assert {s["name"] for s in every} == {"lin", "other"}


def test_metrics(lin):
    for n in (1, 2, 4):
        assert _triton_infer(lin, "lin", {"x": _x(n)}).as_numpy("y").shape == (n, 3)
    assert lin.infer_json("lin", np.zeros((1, 5), np.float32)).status_code == 400
    for name in ("ghost", "ghost2", "ghost3"):
        assert lin.infer_json(name, _x(1)).status_code == 404
    assert lin.infer_json("lin", _x(1), version="7").status_code == 404
    m = lin.metrics()

    def value(name, **labels):
        return m.get((name, frozenset(labels.items())), 0)

    assert value("optiserve_requests_total", model="lin", version="1", protocol="rest",
                 outcome="success") == 3
    assert value("optiserve_requests_total", model="lin", version="1", protocol="rest",
                 outcome="bad_request") == 1
    # unknown models (and versions) count under one bounded label, never their own names
    assert value("optiserve_requests_total", model="_unknown", version="", protocol="rest",
                 outcome="not_found") == 4
    assert not any(dict(labels).get("model", "").startswith("ghost") for _, labels in m)
    for phase in ("queue", "compute", "total"):
        assert value("optiserve_request_duration_seconds_count", model="lin", version="1",
                     phase=phase) == 3, phase
    assert value("optiserve_batch_size_count", model="lin", version="1") >= 1
    assert value("optiserve_batch_size_sum", model="lin", version="1") == 7
    assert value("optiserve_inference_count_total", model="lin", version="1") == 7
    assert ("optiserve_queue_depth", frozenset({"model": "lin", "version": "1"}.items())) in m
    assert value("optiserve_loaded_versions") == 1
    assert value("optiserve_model_loads_total", model="lin", outcome="success") == 1


# -- concurrency ------------------------------------------------------------------------------
@pytest.mark.slow
def test_64_concurrent_requests_are_batched(served):
    served.register("mlp", mlp_onnx((32, 64, 8)))
    served.deploy("mlp", max_batch_size=64, max_queue_delay_us=20_000)
    xs = [_x(1 + i % 3, seed=i, width=32) for i in range(64)]

    async def main():
        async with httpx.AsyncClient(base_url=served.live.url, headers=served.headers(),
                                     timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[c.post("/v2/models/mlp/infer", json={"inputs": [
                {"name": "x", "shape": list(x.shape), "datatype": "FP32",
                 "data": x.tolist()}]}) for x in xs])

    for x, r in zip(xs, asyncio.run(main())):
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 8)
        np.testing.assert_allclose(got, served.expected("mlp", {"x": x})[0], rtol=1e-4,
                                   atol=1e-5)
    [stats] = served.stats("mlp")
    assert stats["inference_count"] == sum(len(x) for x in xs)
    assert stats["execution_count"] < 64 <= stats["inference_count"]
    assert stats["inference_stats"]["success"]["count"] == 64


# -- the repository extension -----------------------------------------------------------------
def test_repository_index_load_and_unload(served):
    served.register("idx", linear_onnx(4, 3))
    index = served.triton.get_model_repository_index(headers=served.headers())
    assert index == [{"name": "idx", "version": "", "state": "UNAVAILABLE",
                      "reason": "not deployed"}]
    assert not served.triton.is_model_ready("idx", headers=served.headers())

    served.triton.load_model("idx", headers=served.headers(),
                             config=json.dumps({"max_batch_size": 4}))
    assert served.live.registry.deployments.get("idx").spec.max_batch_size == 4
    assert served.triton.get_model_config("idx", headers=served.headers())["max_batch_size"] == 4
    assert served.triton.get_model_repository_index(headers=served.headers()) == [
        {"name": "idx", "version": "1", "state": "READY", "reason": ""}]
    ready_only = served.http.post("/v2/repository/index", json={"ready": True}).json()
    assert [e["name"] for e in ready_only] == ["idx"]
    assert _triton_infer(served, "idx", {"x": _x(4)}).as_numpy("y").shape == (4, 3)

    # a load without config keeps the stored settings
    served.triton.load_model("idx", headers=served.headers())
    assert served.live.registry.deployments.get("idx").spec.max_batch_size == 4

    # unload keeps the deployment and its settings, as Triton does (issue 16)
    served.triton.unload_model("idx", headers=served.headers())
    [kept] = served.live.registry.deployments.list()
    assert (kept.name, kept.loaded, kept.spec.max_batch_size) == ("idx", False, 4)
    assert served.infer_json("idx", _x(1)).status_code == 404
    assert served.http.post("/v2/repository/index", json={}).json() == [
        {"name": "idx", "version": "", "state": "UNAVAILABLE",
         "reason": "unloaded (settings kept; load it to serve again)"}]
    assert served.http.get("/v2/health/ready").status_code == 200
    served.triton.load_model("idx", headers=served.headers())
    assert served.triton.get_model_config("idx", headers=served.headers())["max_batch_size"] == 4
    assert served.live.registry.deployments.get("idx").loaded
    assert _triton_infer(served, "idx", {"x": _x(4)}).as_numpy("y").shape == (4, 3)


def test_load_of_an_unknown_model_is_4xx_and_the_server_stays_ready(lin):
    r = lin.http.post("/v2/repository/models/nobody/load", json={})
    assert 400 <= r.status_code < 500 and "nobody" in r.json()["error"]
    r = lin.http.put("/api/v1/deployments/typo", json={"model": "linn"})
    assert 400 <= r.status_code < 500 and "linn" in r.json()["error"]
    assert lin.live.registry.deployments.list()[0].name == "lin"
    assert lin.live.client(token=None).get("/v2/health/ready").status_code == 200
    assert lin.triton.is_server_ready()
    assert lin.infer_json("lin", _x(1)).status_code == 200


# -- versions ---------------------------------------------------------------------------------
def _version_of(s: Served, name: str, x: np.ndarray, version: str | None = None) -> str:
    r = s.infer_json(name, x, version)
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array(body["outputs"][0]["data"], np.float32).reshape(len(x), -1)
    np.testing.assert_allclose(got, s.expected(name, {"x": x}, int(body["model_version"]))[0],
                               rtol=1e-5, atol=1e-6)
    return body["model_version"]


def test_two_versions_served_side_by_side(served):
    served.register("m", linear_onnx(4, 3, seed=0))
    served.register("m", linear_onnx(4, 3, seed=1))
    d = served.deploy("m", versions={"latest": 2})
    assert d["loaded_versions"] == ["1", "2"] and d["state"] == "READY"
    x = _x(2)
    assert _version_of(served, "m", x) == "2"  # the newest by default
    assert _version_of(served, "m", x, "1") == "1"
    assert _version_of(served, "m", x, "2") == "2"
    meta = served.triton.get_model_metadata("m", headers=served.headers())
    assert meta["versions"] == ["1", "2"]
    assert served.triton.get_model_metadata("m", "1", headers=served.headers())["versions"] == ["1"]
    got = _triton_infer(served, "m", {"x": x}, model_version="1")
    assert got.get_response()["model_version"] == "1"
    assert {s["version"] for s in served.stats("m")} == {"1", "2"}


def test_specific_versions(served):
    served.register("m", linear_onnx(4, 3, seed=0))
    served.register("m", linear_onnx(4, 3, seed=1))
    served.deploy("m", versions={"specific": [1]})
    assert _version_of(served, "m", _x(1)) == "1"
    r = served.infer_json("m", _x(1), "2")
    assert r.status_code == 404 and "version '2'" in r.json()["error"]
    config = served.triton.get_model_config("m", headers=served.headers())
    assert config["version_policy"] == {"specific": {"versions": [1]}}


def test_hot_reload_switches_to_a_new_version(served):
    served.register("m", linear_onnx(4, 3, seed=0))
    served.deploy("m")
    x = _x(3)
    assert _version_of(served, "m", x) == "1"
    served.register("m", linear_onnx(4, 3, seed=1))
    assert _version_of(served, "m", x) == "1"  # nothing changes until asked
    r = served.http.post("/v2/repository/models/m/load", json={})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "m", "versions": ["2"]}
    assert _version_of(served, "m", x) == "2"
    assert served.infer_json("m", x, "1").status_code == 404
    m = served.metrics()
    assert m[("optiserve_loaded_versions", frozenset())] == 1
    assert ("optiserve_inference_count_total", frozenset({"model": "m", "version": "2"}.items())
            ) in m
    assert not any(dict(labels).get("version") == "1" for name, labels in m), [
        k for k in m if dict(k[1]).get("version") == "1"]  # the unloaded version's series went


def test_new_settings_on_a_loaded_version_keep_its_metrics(lin):
    assert lin.infer_json("lin", _x(2)).status_code == 200
    r = lin.http.post("/v2/repository/models/lin/load",
                      json={"parameters": {"config": json.dumps({"max_batch_size": 4})}})
    assert r.status_code == 200, r.text
    assert lin.triton.get_model_config("lin", headers=lin.headers())["max_batch_size"] == 4
    assert lin.infer_json("lin", _x(3)).status_code == 200
    m = lin.metrics()
    key = frozenset({"model": "lin", "version": "1"}.items())
    assert m.get(("optiserve_inference_count_total", key)) == 5
    assert m.get(("optiserve_batch_size_count", key)) == 2
    assert ("optiserve_queue_depth", key) in m


def test_failed_load_keeps_the_old_version_serving(lin):
    changes = [{"versions": {"specific": [1, 9]}}, {"runtime": "sklearn"},
               {"runtime": "tensorflow"}]
    for change in changes:
        _failed_load(lin, change)
    m = lin.metrics()
    assert m[("optiserve_model_loads_total", frozenset({"model": "lin",
                                                       "outcome": "failure"}.items()))] == 6


def _failed_load(lin: Served, change: dict) -> None:
    x = _x(2)
    r = lin.http.put("/api/v1/deployments/lin", json={"max_batch_size": 8, **change})
    assert 400 <= r.status_code < 500, r.text
    assert "did not load" in r.json()["error"]
    assert _version_of(lin, "lin", x) == "1"
    assert lin.live.registry.deployments.get("lin").spec.max_batch_size == 8
    assert lin.live.registry.deployments.get("lin").spec.runtime is None
    r = lin.http.post("/v2/repository/models/lin/load",
                      json={"parameters": {"config": change}})
    assert 400 <= r.status_code < 500
    assert "What served before still serves" in r.json()["error"]
    assert _version_of(lin, "lin", x) == "1"
    index = lin.triton.get_model_repository_index(headers=lin.headers())
    assert [(e["name"], e["state"]) for e in index] == [("lin", "READY")]
    assert lin.http.get("/v2/health/ready").status_code == 200


# -- the deployments API ----------------------------------------------------------------------
def test_deployments_api(served):
    served.register("lin", linear_onnx(4, 3))
    assert served.http.get("/api/v1/deployments").json() == {"deployments": []}
    d = served.deploy("fast", model="lin", max_batch_size=16, preferred_batch_sizes=[8],
                      max_queue_delay_us=100, instances=2, threads=1)
    assert d["name"] == "fast" and d["spec"]["model"] == "lin"
    assert d["spec"]["instances"] == 2 and d["loaded_versions"] == ["1"]
    listed = served.http.get("/api/v1/deployments").json()["deployments"]
    assert [x["name"] for x in listed] == ["fast"]
    one = served.http.get("/api/v1/deployments/fast").json()
    assert one["spec"]["preferred_batch_sizes"] == [8] and one["state"] == "READY"
    assert _triton_infer(served, "fast", {"x": _x(2)}).as_numpy("y").shape == (2, 3)

    for body, field in [({"max_batch_sise": 3}, "max_batch_sise"),
                        ({"max_batch_size": -1}, "max_batch_size"),
                        ({"versions": {"latest": 1, "specific": [1]}}, "versions"),
                        ({"preferred_batch_sizes": [32], "max_batch_size": 16},
                         "preferred batch size 32"),
                        ({"instances": "many"}, "instances")]:
        r = served.http.put("/api/v1/deployments/fast", json={"model": "lin", **body})
        assert r.status_code == 400, (body, r.text)
        assert field in r.json()["error"], r.json()
    assert served.http.get("/api/v1/deployments/fast").json()["spec"] == one["spec"]

    r = served.http.delete("/api/v1/models/lin")
    assert r.status_code == 409 and "fast" in r.json()["error"]
    assert served.http.delete("/api/v1/deployments/fast").json() == {"deleted": "fast"}
    assert served.http.get("/api/v1/deployments/fast").status_code == 404
    assert served.http.delete("/api/v1/deployments/fast").status_code == 404
    assert served.infer_json("fast", _x(1)).status_code == 404
    assert served.http.delete("/api/v1/models/lin").status_code == 200


def test_deployment_names_are_checked(served):
    served.register("lin", linear_onnx(4, 3))
    r = served.http.put("/api/v1/deployments/bad%20name", json={"model": "lin"})
    assert r.status_code == 400 and "not allowed" in r.json()["error"]
    assert served.http.get("/v2/health/ready").status_code == 200
    # nothing was loaded under the refused name either
    assert served.http.get("/v2/models/bad%20name").status_code == 404
    assert served.http.post("/v2/repository/index").json()[0]["name"] == "lin"


# -- API keys ---------------------------------------------------------------------------------
def test_keys_and_scopes(lin):
    x = _x(1)
    anon = lin.live.client(token=None)
    assert anon.get("/v2/health/live").status_code == 200
    assert anon.get("/v2/health/ready").status_code == 200
    r = anon.post("/v2/models/lin/infer", json={"inputs": []})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "needs an API key" in r.json()["error"]
    r = lin.live.client("osk_nope_nope").post("/v2/models/lin/infer", json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

    reader = lin.live.client(lin.live.key("read"))
    assert reader.get("/v2/models/lin").status_code == 200
    r = reader.post("/v2/models/lin/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]})
    assert r.status_code == 403 and "infer" in r.json()["error"]

    inferrer = lin.live.client(lin.live.key("infer"))
    r = inferrer.post("/v2/models/lin/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]})
    assert r.status_code == 200, r.text
    assert inferrer.get("/v2/models/lin/config").status_code == 200
    assert inferrer.post("/v2/repository/models/lin/unload").status_code == 403
    assert inferrer.post("/v2/repository/index").status_code == 403
    assert inferrer.put("/api/v1/deployments/lin", json={}).status_code == 403
    assert lin.infer_json("lin", x).status_code == 200  # the deployment is still there
    assert anon.get("/metrics").status_code == 401
    assert inferrer.get("/metrics").status_code == 200
    assert reader.get("/metrics").status_code == 200

    with pytest.raises(InferenceServerException, match="401|API key"):
        lin.triton.infer("lin", [tc.InferInput("x", [1, 4], "FP32").set_data_from_numpy(x)])


def test_key_cache_forgets_a_revoked_key_within_its_ttl(registry):
    from optiserve.core.errors import AuthError, ScopeError
    from optiserve.server.auth import KeyCache

    key, token = registry.keys.create("svc", ["infer"])
    cache = KeyCache(registry.keys, ttl_s=0.1)
    assert cache.verify(token, "infer").id == key.id
    with pytest.raises(ScopeError):
        cache.verify(token, "models:write")  # a cached key still gets only its scopes
    registry.keys.revoke(key.id)
    assert cache.verify(token, "infer").id == key.id  # cached: still valid for up to ttl_s
    time.sleep(0.15)
    with pytest.raises(AuthError, match="revoked"):
        cache.verify(token, "infer")
    with pytest.raises(AuthError, match="not valid"):
        cache.verify(token[:-2] + "xx", "infer")  # failures are never remembered
