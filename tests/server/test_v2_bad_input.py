"""Each bad Open Inference Protocol request over REST: a 4xx (never a 500) with a JSON
{"error": ...} that names the problem, and the server goes on serving the next request."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import numpy as np
import pytest

from tests.builders import linear_onnx, mlp_onnx
from tests.server.test_v2_rest import Served, types_onnx

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def _error(r: httpx.Response, status: int, *needles: str, label: str = "") -> str:
    assert r.status_code == status, (label, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", label
    message = r.json()["error"]
    for needle in needles:
        assert needle.lower() in message.lower(), (label, needle, message)
    return message


def _still_serves(s: Served) -> None:
    r = s.infer_json("lin", X)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 3),
                               s.expected("lin", {"x": X})[0], rtol=1e-5, atol=1e-6)


def _binary(header: dict, raw: bytes, length: int | str | None = None) -> dict:
    """httpx keyword arguments for a binary-extension request."""
    head = json.dumps(header).encode()
    return {"content": head + raw, "headers": {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head) if length is None else length)}}


def _x_entry(**over) -> dict:
    return {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.tolist(), **over}


@pytest.fixture
def bad(make_server, tmp_path) -> Served:
    s = Served(make_server(jobs=False), tmp_path)
    s.register("lin", linear_onnx(4, 3))
    s.deploy("lin", max_batch_size=8)
    s.register("types", types_onnx())
    s.deploy("types")
    yield s
    s.triton.close()


def _check(s: Served, cases) -> None:
    for label, (method, path, kw), status, needles in cases:
        r = s.http.request(method, path, **kw)
        _error(r, status, *needles, label=label)
        _still_serves(s)


INFER = "/v2/models/lin/infer"


def test_tensors_that_do_not_fit_the_model(bad):
    raw = X.tobytes()
    _check(bad, [
        ("wrong shape", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[1, 8])]}}), 400, ["shape [1, 8]", "[-1, 4]"]),
        ("wrong rank", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[8], data=X.reshape(-1).tolist())]}}), 400, ["shape [8]"]),
        ("wrong datatype", ("POST", INFER, {"json": {"inputs": [
            _x_entry(datatype="FP64")]}}), 400, ["datatype FP64", "takes FP32"]),
        ("unknown datatype", ("POST", INFER, {"json": {"inputs": [
            _x_entry(datatype="FLOAT")]}}), 400, ["datatype 'FLOAT'"]),
        ("data shorter than shape", ("POST", INFER, {"json": {"inputs": [
            _x_entry(data=X.reshape(-1).tolist()[:7])]}}), 400, ["7 values", "needs 8"]),
        ("binary shorter than shape", ("POST", INFER, _binary({"inputs": [
            _x_entry(data=None, parameters={"binary_data_size": 28})]}, raw[:28])), 400,
         ["28 bytes", "needs 32"]),
        ("text for FP32", ("POST", INFER, {"json": {"inputs": [
            _x_entry(data=[["a"] * 4] * 2)]}}), 400, ["does not fit datatype FP32"]),
        ("unknown input", ("POST", INFER, {"json": {"inputs": [
            _x_entry(), _x_entry(name="z")]}}), 400, ["no input 'z'", "inputs: x"]),
        ("only an unknown input", ("POST", INFER, {"json": {"inputs": [
            _x_entry(name="X")]}}), 400, ["no input 'X'"]),
        ("unknown output", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                      "outputs": [{"name": "zz"}]}}), 400,
         ["no output 'zz'", "outputs: y"]),
        ("input given twice", ("POST", INFER, {"json": {"inputs": [
            _x_entry(), _x_entry()]}}), 400, ["given twice"]),
        ("rows past max_batch_size", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[9, 4], data=[0.0] * 36)]}}), 400, ["9 rows", "at most 8"]),
        ("a shape claiming terabytes", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[1 << 30, 1 << 30])]}}), 400, ["at most"]),
        ("negative dimension", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[-2, 4])]}}), 400, ["non-negative"]),
    ])


def test_multi_input_mistakes(bad):
    path = "/v2/models/types/infer"
    i = {"name": "i", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    b = {"name": "b", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]}
    s = {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["x"]}
    u = {"name": "u", "shape": [1, 2], "datatype": "UINT8", "data": [1, 2]}
    good = bad.http.post(path, json={"inputs": [i, b, s, u]})
    assert good.status_code == 200, good.text
    text = b"\x02\x00\x00\x00\xff\xfe"  # one BYTES element that is not UTF-8
    _check(bad, [
        ("missing input", ("POST", path, {"json": {"inputs": [i, b, u]}}), 400,
         ["input 's'", "missing"]),
        ("rows disagree", ("POST", path, {"json": {"inputs": [
            i, b, {**s, "shape": [2], "data": ["x", "y"]}, u]}}), 400, ["rows"]),
        ("fraction for INT64", ("POST", path, {"json": {"inputs": [
            {**i, "data": [1, 2.5]}, b, s, u]}}), 400, ["does not fit datatype INT64"]),
        ("2 for BOOL", ("POST", path, {"json": {"inputs": [
            i, {**b, "data": [1, 2]}, s, u]}}), 400, ["does not fit datatype BOOL"]),
        ("256 for UINT8", ("POST", path, {"json": {"inputs": [
            i, b, s, {**u, "data": [1, 256]}]}}), 400, ["does not fit datatype UINT8"]),
        ("number for BYTES", ("POST", path, {"json": {"inputs": [
            i, b, {**s, "data": [3]}, u]}}), 400, ["does not fit datatype BYTES"]),
        ("text that is not UTF-8", ("POST", path, _binary({"inputs": [
            i, b, {"name": "s", "shape": [1], "datatype": "BYTES",
                   "parameters": {"binary_data_size": len(text)}}, u]}, text)), 400,
         ["not UTF-8"]),
    ])


def test_unknown_models_and_versions(bad):
    _check(bad, [
        ("unknown model", ("POST", "/v2/models/ghost/infer", {"json": {"inputs": [
            _x_entry()]}}), 404, ["No model 'ghost'", "lin"]),
        ("unknown model metadata", ("GET", "/v2/models/ghost", {}), 404, ["ghost"]),
        ("unknown model config", ("GET", "/v2/models/ghost/config", {}), 404, ["ghost"]),
        ("unknown model stats", ("GET", "/v2/models/ghost/stats", {}), 404, ["ghost"]),
        ("unknown version", ("POST", "/v2/models/lin/versions/9/infer", {"json": {"inputs": [
            _x_entry()]}}), 404, ["version '9'", "Loaded versions: 1"]),
        ("version that is no number", ("POST", "/v2/models/lin/versions/v1/infer",
                                       {"json": {"inputs": [_x_entry()]}}), 404,
         ["version 'v1'"]),
        ("unknown version metadata", ("GET", "/v2/models/lin/versions/9", {}), 404,
         ["version '9'"]),
        ("unknown endpoint", ("GET", "/v2/modelz", {}), 404, ["No endpoint /v2/modelz"]),
        ("unload of nothing", ("POST", "/v2/repository/models/ghost/unload", {}), 404,
         ["ghost"]),
    ])


def test_malformed_requests(bad):
    raw = X.tobytes()
    entry = _x_entry(data=None, parameters={"binary_data_size": 32})
    del entry["data"]
    _check(bad, [
        ("invalid JSON", ("POST", INFER, {"content": b'{"inputs": [', "headers": {
            "Content-Type": "application/json"}}), 400, ["not valid JSON"]),
        ("empty body", ("POST", INFER, {"content": b""}), 400, ["not valid JSON"]),
        ("JSON array", ("POST", INFER, {"json": [1, 2]}), 400, ["JSON object"]),
        ("JSON string", ("POST", INFER, {"json": "x"}), 400, ["JSON object"]),
        ("no inputs", ("POST", INFER, {"json": {}}), 400, ["no 'inputs' list"]),
        ("empty inputs", ("POST", INFER, {"json": {"inputs": []}}), 400, ["no 'inputs'"]),
        ("inputs not a list", ("POST", INFER, {"json": {"inputs": {"x": 1}}}), 400,
         ["no 'inputs' list"]),
        ("input without a name", ("POST", INFER, {"json": {"inputs": [{"shape": [1]}]}}), 400,
         ["'name'"]),
        ("input that is a number", ("POST", INFER, {"json": {"inputs": [3]}}), 400, ["'name'"]),
        ("input without data", ("POST", INFER, {"json": {"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32"}]}}), 400,
         ["neither 'data' nor a binary_data_size"]),
        ("parameters not an object", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                              "parameters": [1]}}), 400,
         ["parameters"]),
        ("timeout not a number", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                          "parameters": {"timeout": "1s"}}}),
         400, ["timeout"]),
        ("output without a name", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                           "outputs": ["y"]}}), 400,
         ["requested output"]),
        ("header length past the body", ("POST", INFER, _binary({"inputs": [entry]}, raw,
                                                                length=10_000)), 400,
         ["Inference-Header-Content-Length", "10000"]),
        ("header length not a number", ("POST", INFER, _binary({"inputs": [entry]}, raw,
                                                               length="12a")), 400,
         ["Inference-Header-Content-Length"]),
        ("header length negative", ("POST", INFER, _binary({"inputs": [entry]}, raw,
                                                           length="-5")), 400,
         ["Inference-Header-Content-Length"]),
        ("header length cutting the JSON", ("POST", INFER, _binary({"inputs": [entry]}, raw,
                                                                   length=20)), 400,
         ["not valid JSON"]),
        ("binary_data_size past the end", ("POST", INFER, _binary({"inputs": [entry]},
                                                                  raw[:16])), 400,
         ["binary_data_size 32", "16 bytes"]),
        ("binary_data_size negative", ("POST", INFER, _binary({"inputs": [
            {**entry, "parameters": {"binary_data_size": -4}}]}, raw)), 400,
         ["binary_data_size -4"]),
        ("binary_data_size a string", ("POST", INFER, _binary({"inputs": [
            {**entry, "parameters": {"binary_data_size": "32"}}]}, raw)), 400,
         ["binary_data_size '32'"]),
        ("leftover bytes", ("POST", INFER, _binary({"inputs": [entry]}, raw + b"\x00" * 8)),
         400, ["8 bytes of binary data", "no input claims them"]),
        ("bytes without the header length", ("POST", INFER, {
            "content": json.dumps({"inputs": [entry]}).encode() + raw}), 400,
         ["not valid JSON"]),
        ("gzip that is not gzip", ("POST", INFER, {"content": b"not gzip at all", "headers": {
            "Content-Encoding": "gzip"}}), 400, ["gzip", "does not decompress"]),
        ("load config not JSON", ("POST", "/v2/repository/models/lin/load", {"json": {
            "parameters": {"config": "{max_batch_size"}}}), 400, ["not valid JSON"]),
        ("load config not an object", ("POST", "/v2/repository/models/lin/load", {"json": {
            "parameters": {"config": "[1]"}}}), 400, ["JSON object"]),
        ("load config with a bad field", ("POST", "/v2/repository/models/lin/load", {"json": {
            "parameters": {"config": '{"max_batch_sise": 3}'}}}), 400, ["max_batch_sise"]),
        ("load request not an object", ("POST", "/v2/repository/models/lin/load", {
            "json": [1]}), 400, ["must be a JSON object"]),
    ])
    # nothing above changed the deployment
    assert bad.live.registry.deployments.get("lin").spec.max_batch_size == 8


def test_wrong_http_method_is_405(bad):
    for method, path, allowed in [("GET", INFER, "POST"), ("PUT", INFER, "POST"),
                                  ("POST", "/v2/models/lin", "GET"),
                                  ("DELETE", "/v2/models/lin/config", "GET"),
                                  ("GET", "/v2/repository/index", "POST"),
                                  ("GET", "/v2/repository/models/lin/load", "POST"),
                                  ("POST", "/v2/models/stats", "GET"),
                                  ("POST", "/v2", "GET")]:
        r = bad.http.request(method, path)
        _error(r, 405, f"Method {method}", label=f"{method} {path}")
        assert r.headers["allow"] == allowed
    _still_serves(bad)


def test_nan_and_infinity_refused_unless_the_deployment_allows_them(bad):
    x = X.copy()
    x[0, 1], x[1, 3] = np.nan, np.inf
    entry = {"name": "x", "shape": [2, 4], "datatype": "FP32",
             "parameters": {"binary_data_size": 32}}
    r = bad.http.post(INFER, **_binary({"inputs": [entry]}, x.tobytes()))
    _error(r, 400, "NaN or infinity", "allow_nan")
    _still_serves(bad)
    bad.deploy("lin", max_batch_size=8, allow_nan=True)
    r = bad.http.post(INFER, **_binary({"inputs": [entry], "outputs": [
        {"name": "y", "parameters": {"binary_data": True}}]}, x.tobytes()))
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    got = np.frombuffer(r.content[n:], "<f4").reshape(2, 3)
    want = bad.expected("lin", {"x": x})[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-5)
    # as JSON, a NaN output is null (JSON has no NaN); the request still succeeds
    r = bad.http.post(INFER, **_binary({"inputs": [entry]}, x.tobytes()))
    assert r.status_code == 200 and None in r.json()["outputs"][0]["data"]


def test_oversized_bodies_are_413(make_server, tmp_path):
    s = Served(make_server(jobs=False, max_request_mb=0.01), tmp_path)  # 10 kB
    s.register("lin", linear_onnx(4, 3))
    s.deploy("lin", max_batch_size=8)
    big = np.zeros((4, 4), np.float32).tolist()
    entry = {"name": "x", "shape": [4, 4], "datatype": "FP32", "data": big}
    padding = {"inputs": [entry], "id": "x" * 20_000}
    _error(s.http.post(INFER, json=padding), 413, "larger than the limit of 0.01 MB")
    _still_serves(s)
    # a small gzip body that inflates past the limit
    bomb = gzip.compress(json.dumps(padding).encode())
    assert len(bomb) < 10_000
    _error(s.http.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"}), 413,
           "larger than the limit")
    _still_serves(s)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 1000

    _error(s.http.post(INFER, content=chunks()), 413, "larger than the limit")
    _still_serves(s)
    s.triton.close()


@pytest.mark.slow
def test_full_queue_is_429_with_retry_after(bad):
    bad.register("slow", mlp_onnx((128, 1024, 1024, 8)))
    bad.deploy("slow", max_batch_size=0, max_queue_size=1, threads=1)
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [64, 128], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}

    async def flood():
        async with httpx.AsyncClient(base_url=bad.live.url, headers=bad.headers(),
                                     timeout=60, limits=httpx.Limits(max_connections=48)) as c:
            return await asyncio.gather(*[c.post("/v2/models/slow/infer", json=body)
                                          for _ in range(48)])

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, "the queue never filled"
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert "limit" in r.json()["error"] and "max_queue_size" in r.json()["error"]
    want = bad.expected("slow", {"x": x})[0]
    for r in responses:
        if r.status_code == 200:
            got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(64, 8)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    [stats] = bad.stats("slow")
    assert stats["inference_stats"]["fail"]["count"] == len(rejected)
    m = bad.metrics()
    assert m[("optiserve_requests_total", frozenset({
        "model": "slow", "version": "1", "protocol": "rest", "outcome": "rejected"}.items()))
    ] == len(rejected)
    _still_serves(bad)
    assert bad.http.post("/v2/models/slow/infer", json=body).status_code == 200

    # a request's own timeout (microseconds): one still queued then is answered 504
    body["parameters"] = {"timeout": 1}
    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 504} and 504 in codes, codes
    for r in responses:
        if r.status_code == 504:
            assert "reached its timeout" in r.json()["error"]
    _still_serves(bad)


def test_no_500_on_metrics_or_stats_of_an_empty_server(make_server, tmp_path):
    s = Served(make_server(jobs=False), tmp_path)
    assert s.http.get("/v2/models/stats").json() == {"model_stats": []}
    assert s.http.post("/v2/repository/index").json() == []
    assert s.http.get("/metrics").status_code == 200
    assert s.http.get("/v2/health/ready").status_code == 200
    _error(s.infer_json("lin", X), 404, "No model 'lin'", "Served: none")
    s.triton.close()
