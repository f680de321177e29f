"""Inputs that used to answer 500 (issue 16, item 3), over REST and gRPC: each is a 4xx naming
the problem, and the next good request is answered."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from optiserve.server.grpc import inference_pb2 as pb
from tests.server.test_grpc import rows
from tests.server.test_v2_bad_input import INFER, _check, _x_entry


def _nested(depth: int, leaf: str) -> bytes:
    """JSON lists nested `depth` deep around `leaf` (json.dumps cannot build it: recursion)."""
    return b"[" * depth + leaf.encode() + b"]" * depth


def _raw_json(text: bytes) -> dict:
    return {"content": text, "headers": {"Content-Type": "application/json"}}


def test_rest_refuses_what_used_to_be_a_500(bad):
    deep = _nested(1000, '"a"')
    _check(bad, [
        ("65 dimensions", ("POST", INFER, {"json": {"inputs": [
            _x_entry(shape=[1] * 65, data=[1.0])]}}), 400, ["65 dimensions", "at most 32"]),
        ("BYTES nested 1000 deep", ("POST", INFER, _raw_json(
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": '
            + deep + b"}]}")), 400, []),
        ("BYTES nested 100 deep (valid JSON)", ("POST", INFER, _raw_json(
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": '
            + _nested(100, '"a"') + b"}]}")), 400, ["nested more than 64 deep"]),
        ("FP32 nested 100 deep", ("POST", INFER, _raw_json(
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": '
            + _nested(100, "1.0") + b"}]}")), 400, ["does not fit datatype FP32"]),
        ("outputs is a number", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                         "outputs": 5}}), 400, ["'outputs'"]),
        ("outputs is an object", ("POST", INFER, {"json": {"inputs": [_x_entry()],
                                                          "outputs": {"name": "y"}}}), 400,
         ["'outputs'"]),
        ("index body not JSON", ("POST", "/v2/repository/index", _raw_json(b"{ready")), 400,
         ["index request is not valid JSON"]),
        ("index body a list", ("POST", "/v2/repository/index", {"json": [1]}), 400,
         ["JSON object"]),
        ("load body a list", ("POST", "/v2/repository/models/lin/load", {"json": [1]}), 400,
         ["JSON object"]),
        ("load parameters a string", ("POST", "/v2/repository/models/lin/load",
                                      {"json": {"parameters": "x"}}), 400, []),
        ("load config not JSON", ("POST", "/v2/repository/models/lin/load",
                                  {"json": {"parameters": {"config": "{max"}}}), 400,
         ["parameters.config is not valid JSON"]),
    ])


@pytest.mark.slow
def test_grpc_refuses_what_used_to_be_a_500(serve):
    g = serve()
    h = g.metadata()
    x = rows(1)
    cases = {
        "65 dimensions, raw": pb.ModelInferRequest(
            model_name="lin", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[1] * 65)], raw_input_contents=[b"\0" * 4]),
        "65 dimensions, typed": pb.ModelInferRequest(
            model_name="lin", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[1] * 65,
                contents=pb.InferTensorContents(fp32_contents=[1.0]))]),
    }
    for what, request in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            g.stub.ModelInfer(request, metadata=h)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value)
        assert "65 dimensions" in info.value.details(), what
        ok = g.stub.ModelInfer(pb.ModelInferRequest(
            model_name="lin", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[1, 4])], raw_input_contents=[x.tobytes()]),
            metadata=h)
        np.testing.assert_allclose(np.frombuffer(ok.raw_output_contents[0], np.float32),
                                   g.expected(x)[0].reshape(-1), rtol=1e-5, atol=1e-6)
