"""The Open Inference Protocol over gRPC, driven by the unchanged `tritonclient.grpc` against a
real server: health and metadata, inference checked against ONNX Runtime, concurrency, the
repository, statistics, timeouts and queue limits, API keys, and each bad input with its
status code — after which the server still answers."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from optiserve.api import register
from optiserve.core.errors import ConfigError
from optiserve.server.grpc import inference_pb2 as pb
from optiserve.server.grpc.inference_pb2_grpc import GRPCInferenceServiceStub
from tests.builders import IR_VERSION, OPSET, linear_onnx, run_onnx, save_onnx
from tests.server.conftest import free_port


def two_outputs_onnx() -> onnx.ModelProto:
    """y = x @ W + B and z = relu(y): a model with two outputs, to request one of them."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


class Grpc:
    """A live server with gRPC on, the model file served as 'lin', and clients for it."""

    def __init__(self, live, port: int, model_path):
        self.live, self.port, self.model_path = live, port, model_path
        self.triton = tc.InferenceServerClient(f"127.0.0.1:{port}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = GRPCInferenceServiceStub(self.channel)  # for what tritonclient cannot send

    def headers(self, token: str | None = "admin") -> dict:
        """A fresh dict each call: tritonclient may change the one it is given."""
        token = self.live.admin if token == "admin" else token
        return {"authorization": f"Bearer {token}"} if token else {}

    def metadata(self, token: str | None = "admin") -> tuple:
        return tuple(self.headers(token).items())

    def expected(self, x: np.ndarray) -> list[np.ndarray]:
        return run_onnx(self.model_path, {"x": x})

    def close(self) -> None:
        self.triton.close()
        self.channel.close()


@pytest.fixture
def serve(make_server, tmp_path):
    """serve(model=None, **deployment settings) -> Grpc, with the model deployed as 'lin'."""
    opened = []

    def start(model: onnx.ModelProto | None = None, **deployment) -> Grpc:
        port = free_port()
        live = make_server(grpc_port=port, jobs=False)
        path = save_onnx(model or linear_onnx(), tmp_path / f"lin{len(opened)}.onnx")
        register("lin", path, registry=live.registry)
        r = live.client().put("/api/v1/deployments/lin", json={"max_batch_size": 8, **deployment})
        assert r.status_code == 200, r.text
        g = Grpc(live, port, path)
        opened.append(g)
        return g

    yield start
    for g in opened:
        g.close()


def infer_input(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def _tensor(shape: list[int], name: str = "x", datatype: str = "FP32", **fields):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                 **fields)


def _raw_request(shape: list[int], data: bytes, **fields) -> pb.ModelInferRequest:
    """A request tritonclient would not send (it checks shapes), through the generated stub."""
    return pb.ModelInferRequest(model_name="lin", inputs=[_tensor(shape)],
                                raw_input_contents=[data], **fields)


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


# -- health, metadata, configuration ----------------------------------------------------------
def test_health_metadata_config_and_statistics(serve):
    g = serve(max_batch_size=8, instances=2)
    t = g.triton
    assert t.is_server_live() and t.is_server_ready()  # no key needed
    meta = t.get_server_metadata(as_json=True)
    assert meta["name"] == "optiserve" and "model_repository" in meta["extensions"]
    assert t.is_model_ready("lin", headers=g.headers())
    assert t.is_model_ready("lin", "1", headers=g.headers())
    assert not t.is_model_ready("nope", headers=g.headers())
    assert not t.is_model_ready("lin", "9", headers=g.headers())

    m = t.get_model_metadata("lin", headers=g.headers(), as_json=True)
    assert (m["name"], m["versions"], m["platform"]) == ("lin", ["1"], "onnxruntime_onnx")
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert m["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]

    c = t.get_model_config("lin", headers=g.headers()).config  # tritonclient's own message
    assert (c.name, c.platform, c.max_batch_size) == ("lin", "onnxruntime_onnx", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in c.input] == [("x", 11, [4])]  # FP32
    assert [(o.name, list(o.dims)) for o in c.output] == [("y", [3])]
    assert (c.instance_group[0].count, c.instance_group[0].kind) == (2, 2)  # KIND_CPU
    assert c.version_policy.latest.num_versions == 1
    q = c.dynamic_batching.default_queue_policy
    assert (q.max_queue_size, q.default_timeout_microseconds) == (1024, 30_000_000)

    t.infer("lin", [infer_input(rows(3))], headers=g.headers())
    s = t.get_inference_statistics("lin", headers=g.headers(), as_json=True)["model_stats"]
    assert [(x["name"], x["version"]) for x in s] == [("lin", "1")]
    stats = s[0]["inference_stats"]
    assert stats["success"]["count"] == "1" and int(stats["success"]["ns"]) > 0
    assert s[0]["inference_count"] == "3" and s[0]["execution_count"] == "1"
    assert s[0]["batch_stats"][0]["batch_size"] == "3"
    everything = t.get_inference_statistics(headers=g.headers(), as_json=True)["model_stats"]
    assert [x["name"] for x in everything] == ["lin"]


# -- inference --------------------------------------------------------------------------------
def test_infer_raw_and_typed_contents_match_onnxruntime(serve):
    g = serve()
    x = rows(5)
    result = g.triton.infer("lin", [infer_input(x)], request_id="r-1", headers=g.headers())
    assert result.get_response().id == "r-1"
    assert result.get_response().model_version == "1"
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.shape == (5, 3)
    np.testing.assert_allclose(y, g.expected(x)[0], rtol=1e-6, atol=1e-6)

    # typed contents (what the KServe SDKs send), through the generated stub
    request = pb.ModelInferRequest(model_name="lin", inputs=[_tensor(
        [5, 4], contents=pb.InferTensorContents(fp32_contents=x.reshape(-1).tolist()))])
    response = g.stub.ModelInfer(request, metadata=g.metadata())
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == \
        [("y", "FP32", [5, 3])]
    typed = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(5, 3)
    np.testing.assert_allclose(typed, g.expected(x)[0], rtol=1e-6, atol=1e-6)


def test_requested_outputs(serve):
    g = serve(two_outputs_onnx())
    x = rows(2)
    y, z = g.expected(x)
    both = g.triton.infer("lin", [infer_input(x)], headers=g.headers())
    assert [o.name for o in both.get_response().outputs] == ["y", "z"]
    np.testing.assert_allclose(both.as_numpy("y"), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both.as_numpy("z"), z, rtol=1e-6, atol=1e-6)
    only_z = g.triton.infer("lin", [infer_input(x)], outputs=[tc.InferRequestedOutput("z")],
                            headers=g.headers())
    assert [o.name for o in only_z.get_response().outputs] == ["z"]
    assert only_z.as_numpy("y") is None
    np.testing.assert_allclose(only_z.as_numpy("z"), z, rtol=1e-6, atol=1e-6)


def test_concurrent_async_infers_are_each_answered_with_their_own_rows(serve):
    g = serve(max_batch_size=16, max_queue_delay_us=2000)
    done: queue.Queue = queue.Queue()
    inputs = [rows(1 + i % 3, seed=i) for i in range(32)]
    for i, x in enumerate(inputs):
        g.triton.async_infer("lin", [infer_input(x)], request_id=str(i), headers=g.headers(),
                             callback=lambda result, error: done.put((result, error)))
    answers = [done.get(timeout=30) for _ in inputs]
    assert [e for _, e in answers if e is not None] == []
    for result, _ in answers:
        i = int(result.get_response().id)
        np.testing.assert_allclose(result.as_numpy("y"), g.expected(inputs[i])[0],
                                   rtol=1e-6, atol=1e-6)
    s = g.triton.get_inference_statistics("lin", headers=g.headers(), as_json=True)
    stats = s["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == 32
    assert int(stats["inference_count"]) == sum(len(x) for x in inputs)
    assert int(stats["execution_count"]) <= 32


def wait_for_queue_depth(g: Grpc, depth: int, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for family in text_string_to_metric_families(g.live.client().get("/metrics").text):
            if family.name == "optiserve_queue_depth" and \
                    any(s.value == depth for s in family.samples):
                return
        time.sleep(0.01)
    raise AssertionError(f"the queue never held {depth} requests")


@pytest.mark.slow
def test_timeout_parameter_and_full_queue(serve):
    # a batch that is not full waits 300 ms for more rows: long enough to expire or fill up
    g = serve(max_batch_size=8, max_queue_delay_us=300_000, max_queue_size=1)
    x = rows(1)
    assert status_of(lambda: g.triton.infer("lin", [infer_input(x)], timeout=1000,
                                            headers=g.headers())) == "StatusCode.DEADLINE_EXCEEDED"

    request = _raw_request([1, 4], x.tobytes())
    first = g.stub.ModelInfer.future(request, metadata=g.metadata())
    wait_for_queue_depth(g, 1)  # the first is queued, waiting for its batch to fill
    with pytest.raises(grpc.RpcError) as info:
        g.stub.ModelInfer(request, metadata=g.metadata())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_size" in info.value.details()
    assert ("retry-after", "1") in tuple(info.value.trailing_metadata())
    np.testing.assert_allclose(np.frombuffer(first.result(timeout=10).raw_output_contents[0],
                                             "<f4"), g.expected(x)[0][0], rtol=1e-6, atol=1e-6)


# -- model repository -------------------------------------------------------------------------
def test_repository_index_load_and_unload(serve):
    g = serve()
    t, h = g.triton, g.headers
    register("other", g.model_path, registry=g.live.registry)
    index = t.get_model_repository_index(headers=h(), as_json=True)["models"]
    assert {(m["name"], m.get("version"), m["state"]) for m in index} == {
        ("lin", "1", "READY"), ("other", None, "UNAVAILABLE")}

    t.load_model("lin", config=json.dumps({"max_batch_size": 4, "instances": 2}), headers=h())
    c = t.get_model_config("lin", headers=h()).config
    assert (c.max_batch_size, c.instance_group[0].count) == (4, 2)
    assert g.live.registry.deployments.get("lin").spec.max_batch_size == 4

    t.unload_model("lin", headers=h())
    assert not t.is_model_ready("lin", headers=h())
    assert status_of(lambda: t.infer("lin", [infer_input(rows(1))], headers=h())) == \
        "StatusCode.NOT_FOUND"
    t.load_model("lin", headers=h())  # unload kept the settings, as Triton does
    c = t.get_model_config("lin", headers=h()).config
    assert (c.max_batch_size, c.instance_group[0].count) == (4, 2)
    np.testing.assert_allclose(t.infer("lin", [infer_input(rows(2))], headers=h()).as_numpy("y"),
                               g.expected(rows(2))[0], rtol=1e-6, atol=1e-6)

    assert status_of(lambda: t.unload_model("ghost", headers=h())) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:  # a load failure, as on REST
        t.load_model("ghost", headers=h())
    assert info.value.status() == "StatusCode.NOT_FOUND"  # the cause's status
    assert "no model 'ghost'" in info.value.message().lower()
    assert t.is_server_ready()  # a failed new deployment leaves no trace
    assert status_of(lambda: t.load_model("lin", config="{not json", headers=h())) == \
        "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: t.load_model("lin", config='{"max_batch_size": -1}',
                                          headers=h())) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: t.load_model("lin", config="{}", files={"file:1/model.onnx": b"x"},
                                          headers=h())) == "StatusCode.INVALID_ARGUMENT"
    assert t.is_model_ready("lin", headers=h())  # the failed loads changed nothing


# -- bad input and keys -----------------------------------------------------------------------
def test_bad_inputs_get_their_status_and_the_server_goes_on(serve):
    g = serve()
    t, h, x = g.triton, g.headers, rows(1)

    def infer(*inputs, model="lin", version="", outputs=None):
        return lambda: t.infer(model, list(inputs), model_version=version, outputs=outputs,
                               headers=h())

    cases = {
        "wrong shape": (infer(infer_input(rows(1)[:, :3])), "INVALID_ARGUMENT", "shape"),
        "wrong datatype": (infer(infer_input(x.astype(np.float64), datatype="FP64")),
                           "INVALID_ARGUMENT", "FP64"),
        "half floats": (infer(infer_input(x.astype(np.float16), datatype="FP16")),
                        "INVALID_ARGUMENT", "FP16"),
        "unknown model": (infer(infer_input(x), model="nope"), "NOT_FOUND", "nope"),
        "unknown version": (infer(infer_input(x), version="7"), "NOT_FOUND", "version"),
        "unknown input": (infer(infer_input(x, name="q")), "INVALID_ARGUMENT", "no input 'q'"),
        "unknown output": (infer(infer_input(x), outputs=[tc.InferRequestedOutput("w")]),
                           "INVALID_ARGUMENT", "no output 'w'"),
        "too many rows": (infer(infer_input(rows(9))), "INVALID_ARGUMENT", "at most 8"),
        "NaN": (infer(infer_input(np.full((1, 4), np.nan, np.float32))), "INVALID_ARGUMENT",
                "NaN"),
    }
    for what, (call, code, needle) in cases.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == f"StatusCode.{code}", (what, info.value)
        assert needle.lower() in info.value.message().lower(), (what, info.value.message())

    raw_cases = {
        "raw length": (_raw_request([1, 4], b"\0" * 12), "12 bytes"),
        "negative dim": (_raw_request([-1, 4], x.tobytes()), "non-negative"),
        "raw for some inputs": (pb.ModelInferRequest(
            model_name="lin", inputs=[_tensor([1, 4]), _tensor([1, 4], name="q")],
            raw_input_contents=[x.tobytes()]), "raw_input_contents"),
        "typed count": (pb.ModelInferRequest(model_name="lin", inputs=[_tensor(
            [1, 4], contents=pb.InferTensorContents(fp32_contents=[1, 2]))]), "2 values"),
        "typed wrong field": (pb.ModelInferRequest(model_name="lin", inputs=[_tensor(
            [1, 4], contents=pb.InferTensorContents(int_contents=[1, 2, 3, 4]))]),
            "int_contents"),
        "timeout type": (_raw_request([1, 4], x.tobytes(), parameters={
            "timeout": pb.InferParameter(string_param="soon")}), "timeout"),
        "no inputs": (pb.ModelInferRequest(model_name="lin"), "no inputs"),
    }
    for what, (request, needle) in raw_cases.items():
        with pytest.raises(grpc.RpcError) as info:
            g.stub.ModelInfer(request, metadata=g.metadata())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value)
        assert needle.lower() in info.value.details().lower(), (what, info.value.details())

    good = t.infer("lin", [infer_input(x)], headers=h())
    np.testing.assert_allclose(good.as_numpy("y"), g.expected(x)[0], rtol=1e-6, atol=1e-6)
    stats = t.get_inference_statistics("lin", headers=h(), as_json=True)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == "1"
    assert stats["inference_stats"]["fail"]["count"] == "14"  # those that named the model
    counted = {(s.labels["model"], s.labels["outcome"]): s.value
               for family in text_string_to_metric_families(g.live.client().get("/metrics").text)
               for s in family.samples
               if s.name == "optiserve_requests_total" and s.labels["protocol"] == "grpc"}
    # the unknown model and the unknown version count under _unknown, the rest under lin
    assert counted == {("_unknown", "not_found"): 2, ("lin", "bad_request"): 14,
                       ("lin", "success"): 1}


def test_api_keys_and_scopes(serve):
    g = serve()
    t, x = g.triton, rows(1)
    reader, writer = g.live.key("read"), g.live.key("models:write")

    def infer(headers):
        return lambda: t.infer("lin", [infer_input(x)], headers=headers)

    assert status_of(infer({})) == "StatusCode.UNAUTHENTICATED"
    assert status_of(infer(g.headers("osk_nope_nope"))) == "StatusCode.UNAUTHENTICATED"
    assert status_of(infer({"authorization": "Basic abc"})) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: t.get_model_metadata("lin")) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: t.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"
    assert status_of(infer(g.headers(reader))) == "StatusCode.PERMISSION_DENIED"
    assert status_of(lambda: t.unload_model("lin", headers=g.headers(reader))) == \
        "StatusCode.PERMISSION_DENIED"
    assert status_of(lambda: t.get_model_metadata("lin", headers=g.headers(writer))) == \
        "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as info:
        infer(g.headers(writer))()
    assert "infer" in info.value.message() and "models:write" in info.value.message()

    # health and server metadata are open; a read key reads; X-API-Key works too
    assert t.is_server_live() and t.is_server_ready() and t.get_server_metadata()
    assert t.get_model_metadata("lin", headers=g.headers(reader)).name == "lin"
    assert t.get_model_repository_index(headers=g.headers(reader)).models
    infer_key = g.live.key("infer")
    np.testing.assert_allclose(infer({"x-api-key": infer_key})().as_numpy("y"),
                               g.expected(x)[0], rtol=1e-6, atol=1e-6)


def test_auth_off_needs_no_key(make_server, tmp_path):
    port = free_port()
    live = make_server(grpc_port=port, jobs=False, auth="off")
    register("lin", save_onnx(linear_onnx(), tmp_path / "m.onnx"), registry=live.registry)
    assert live.client(token=None).put("/api/v1/deployments/lin", json={}).status_code == 200
    with tc.InferenceServerClient(f"127.0.0.1:{port}") as t:
        assert t.infer("lin", [infer_input(rows(2))]).as_numpy("y").shape == (2, 3)
        assert t.get_model_repository_index().models


# -- the port ---------------------------------------------------------------------------------
def test_a_port_in_use_is_a_config_error_naming_the_setting():
    from optiserve.core.settings import load_settings
    from optiserve.server.grpc.server import start_grpc

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(grpc_port=port)
        with pytest.raises(ConfigError) as info:
            asyncio.run(start_grpc(None, None, settings, host="127.0.0.1"))
    message = str(info.value)
    assert str(port) in message and "OPTISERVE_GRPC_PORT" in message and "--grpc-port" in message


# -- typed contents, decoded without a server -------------------------------------------------
def test_typed_contents_decode_each_datatype_and_refuse_what_does_not_fit():
    from optiserve.server.grpc.codec import from_contents
    from optiserve.server.tensors import TensorError

    c = pb.InferTensorContents
    int8 = from_contents("a", [2, 2], "INT8", c(int_contents=[-128, 0, 1, 127]))
    assert int8.dtype == np.int8 and int8.tolist() == [[-128, 0], [1, 127]]
    assert from_contents("b", [2], "BYTES", c(bytes_contents=[b"hi", b""])).tolist() == \
        [b"hi", b""]
    assert from_contents("c", [3], "BOOL", c(bool_contents=[True, False, True])).dtype == bool
    assert from_contents("d", [1], "UINT64", c(uint64_contents=[2**64 - 1]))[0] == 2**64 - 1
    assert from_contents("e", [0, 4], "FP64", c()).shape == (0, 4)
    for shape, dt, contents, needle in [
            ([1], "INT8", c(int_contents=[128]), "outside the range of INT8"),
            ([1], "UINT8", c(uint_contents=[256]), "outside the range of UINT8"),
            ([1], "FP16", c(fp32_contents=[1.0]), "raw_input_contents"),
            ([1], "BF16", c(), "datatype 'BF16'"),
            ([2], "INT64", c(int64_contents=[1]), "1 values but shape [2] needs 2"),
            ([-2], "INT64", c(), "non-negative")]:
        with pytest.raises(TensorError) as info:
            from_contents("t", shape, dt, contents)
        assert needle in str(info.value), (dt, str(info.value))
