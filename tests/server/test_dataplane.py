"""`DataPlane.infer` is the one entry point for inference: a face that only builds an
`InferRequest` and reads the `InferResponse` serves a model, with the same checks, split
policy and counters as the protocol faces (which the rest of tests/server drive over the
wire)."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

import optiserve
from optiserve.core.errors import ModelNotFound
from optiserve.registry.deployments import parse_spec
from optiserve.server.dataplane import DataPlane, InferRequest, Payload
from optiserve.server.tensors import TensorError
from tests.builders import linear_onnx


@pytest.fixture
def plane(sqlite_registry, tmp_path):
    model = linear_onnx(4, 3)
    optiserve.register("lin", model, registry=sqlite_registry)
    sqlite_registry.deployments.put("lin", parse_spec({"model": "lin", "max_batch_size": 4}))
    session = ort.InferenceSession(model.SerializeToString())
    return DataPlane(sqlite_registry, cores=2), session


def _counts(plane: DataPlane, protocol: str) -> dict[tuple[str, str], float]:
    return {(s.labels["model"], s.labels["outcome"]): s.value
            for family in plane.metrics.registry.collect() for s in family.samples
            if s.name == "optiserve_requests_total" and s.labels["protocol"] == protocol}


def test_a_new_face_serves_by_calling_infer_alone(plane):
    plane, session = plane
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)

    async def face():
        await plane.load_all()
        try:
            response = await plane.infer(InferRequest("lin", Payload({"x": (x, "FP32")},
                                                                     id="r1"), protocol="new"))
            # the payload may be decoded for the version chosen to answer
            seen = []

            def decode(served):
                seen.append(served.version)
                return Payload({"x": (x[:1], "FP32")}, ["y"])

            one = await plane.infer(InferRequest("lin", decode, protocol="new"))
            return response, one, seen, _counts(plane, "new")
        finally:
            await plane.close()

    response, one, seen, counts = asyncio.run(face())
    assert (response.model, response.version, response.id, response.rows) == ("lin", "1",
                                                                              "r1", 3)
    np.testing.assert_allclose(response.outputs["y"], session.run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    assert seen == ["1"] and list(one.outputs) == ["y"] and one.outputs["y"].shape == (1, 3)
    assert counts == {("lin", "success"): 2}


def test_one_split_policy_and_every_outcome_counted(plane):
    plane, session = plane
    x = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)

    def bad(_served):
        raise TensorError("cannot decode")

    async def face():
        await plane.load_all()
        try:
            split = await plane.infer(InferRequest("lin", Payload({"x": (x, "FP32")}),
                                                   protocol="new", split=True))
            errors = []
            for request in (InferRequest("lin", Payload({"x": (x, "FP32")}), protocol="new"),
                            InferRequest("lin", bad, protocol="new"),
                            InferRequest("ghost", Payload({"x": (x, "FP32")}), protocol="new"),
                            InferRequest("lin", Payload({"x": (x, "FP32")}), "9",
                                         protocol="new")):
                with pytest.raises((TensorError, ModelNotFound)) as info:
                    await plane.infer(request)
                errors.append(str(info.value))
            return split, errors, _counts(plane, "new")
        finally:
            await plane.close()

    split, errors, counts = asyncio.run(face())
    # the max_batch_size is 4: split, 10 rows come back in order; not split, refused
    np.testing.assert_allclose(split.outputs["y"], session.run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    assert "at most 4" in errors[0] and "cannot decode" in errors[1]
    assert "No model 'ghost'" in errors[2] and "no version '9'" in errors[3]
    # a decoding mistake counts under the version that was to answer it
    assert counts == {("lin", "success"): 1, ("lin", "bad_request"): 2,
                                     ("_unknown", "not_found"): 2}
