"""server/errors.py is the one table from an error class to its HTTP status, gRPC code and
headers: every OptiserveError class resolves to a row, and the /v2 REST layer, /api/v1 predict
and gRPC answer the same for the same mistake, made for real against a live server."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

import optiserve
from optiserve.core.errors import AuthError, ModelNotFound, OptiserveError, ScopeError
from optiserve.server.batching import QueueFull
from optiserve.server.errors import TABLE, error_headers, face
from optiserve.server.grpc import inference_pb2 as pb
from optiserve.server.tensors import TensorError
from tests.server.test_grpc import (_raw_request, rows, serve,  # noqa: F401 (a fixture)
                                    wait_for_queue_depth)
from tests.server.test_v2_bad_input import _x_entry

_CLASS = re.compile(r"^class (\w+)\(([^)]*)\):", re.M)
# the gRPC codes an HTTP status may pair with (4xx the caller's to fix: more than one fits)
_PAIRS = {401: {"UNAUTHENTICATED"}, 403: {"PERMISSION_DENIED"}, 404: {"NOT_FOUND"},
          429: {"RESOURCE_EXHAUSTED"}, 500: {"INTERNAL"}, 503: {"UNAVAILABLE"},
          504: {"DEADLINE_EXCEEDED"}, 507: {"RESOURCE_EXHAUSTED"},
          408: {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED"}}


def every_error_class() -> set[type]:
    """Import each module of optiserve that defines a subclass of a known error class (until
    no new one turns up), then walk OptiserveError's subclasses recursively."""
    root = Path(optiserve.__file__).parent
    sources = {p: p.read_text() for p in root.rglob("*.py")}
    known, imported = {"OptiserveError"}, set()
    while True:
        todo = {p for p, text in sources.items() if p not in imported and any(
            {b.strip().split(".")[-1] for b in bases.split(",")} & known
            for _, bases in _CLASS.findall(text))}
        if not todo:
            break
        for path in todo:
            module = ".".join(("optiserve",) + path.relative_to(root).with_suffix("").parts)
            importlib.import_module(module)
            known |= {name for name, _ in _CLASS.findall(sources[path])}
        imported |= todo
    found, stack = set(), [OptiserveError]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    assert len(found) > 25, sorted(c.__name__ for c in found)
    return found


def test_every_error_class_has_a_row_and_no_status_of_its_own():
    fallback = TABLE[Exception]
    for cls in every_error_class():
        row = face(cls)
        assert row is not fallback, f"{cls.__qualname__} falls through to 500"
        assert 400 <= row.http < 600, cls
        assert row.grpc.name in _PAIRS.get(row.http, {"INVALID_ARGUMENT", "FAILED_PRECONDITION",
                                                      "UNIMPLEMENTED"}), (cls, row)
        assert not hasattr(cls, "status"), f"{cls.__qualname__} still carries a status"


def test_wrapped_errors_and_headers():
    from optiserve.server.served import LoadFailed

    failed = LoadFailed("churn", ModelNotFound("churn"), serving=False)
    assert face(failed) == face(ModelNotFound) and face(failed).http == 404
    assert error_headers(QueueFull("m", 3)) == {"Retry-After": "1"}
    assert error_headers(AuthError("no key")) == {"WWW-Authenticate": "Bearer"}
    assert error_headers(ModelNotFound("m")) == {}
    assert face(RuntimeError("our bug")).http == 500


# -- every face, for real ------------------------------------------------------------------------
class Faces:
    """One mistake sent to /v2 REST, /api/v1 predict and gRPC: what each answered."""

    def __init__(self, g):
        self.g, self.http = g, g.live.client(token=None)

    def _auth(self, token) -> dict:
        token = self.g.live.admin if token == "admin" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def v2(self, model: str, entry: dict, token="admin"):
        return self.http.post(f"/v2/models/{model}/infer", json={"inputs": [entry]},
                              headers=self._auth(token))

    def predict(self, model: str, x: list, token="admin"):
        return self.http.post(f"/api/v1/models/{model}/predict", json={"inputs": {"x": x}},
                              headers=self._auth(token))

    def grpc(self, request: pb.ModelInferRequest, token="admin") -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.g.stub.ModelInfer(request, metadata=self.g.metadata(token))
        return info.value

    def check(self, error: type, rest: list, rpc: grpc.RpcError, header: str | None = None):
        """Each face answered `error`'s row: the same status / code, the same header."""
        row = face(error)
        for r in rest:
            assert r.status_code == row.http, (error.__name__, r.request.url, r.text)
            assert "error" in r.json()
        assert rpc.code() == row.grpc, (error.__name__, rpc.details())
        if header:
            want = error_headers(_sample(error))[header]
            for r in rest:
                assert r.headers.get(header) == want, (error.__name__, r.request.url)
            assert (header.lower(), want) in tuple(rpc.trailing_metadata()), rpc


def _sample(error: type) -> OptiserveError:
    return QueueFull("m", 1) if error is QueueFull else error("sample")


@pytest.mark.slow
def test_each_face_answers_the_same(serve):
    # a batch that is not full waits 3 s for more rows: the queue-full case fills the queue
    g = serve(max_batch_size=8, max_queue_delay_us=3_000_000, max_queue_size=1)
    f = Faces(g)
    x, good = rows(1), _x_entry(shape=[1, 4], data=rows(1).tolist())
    read_only = g.live.key("read")

    f.check(ModelNotFound, [f.v2("nope", good), f.predict("nope", x.tolist())],
            f.grpc(pb.ModelInferRequest(model_name="nope", inputs=[])))
    f.check(TensorError,  # a shape the model does not take
            [f.v2("lin", _x_entry(shape=[1, 8], data=np.zeros((1, 8)).tolist())),
             f.predict("lin", [[1, 2, 3]])],
            f.grpc(_raw_request([1, 8], np.zeros((1, 8), np.float32).tobytes())))
    f.check(AuthError, [f.v2("lin", good, token=None), f.predict("lin", x.tolist(), token=None)],
            f.grpc(_raw_request([1, 4], x.tobytes()), token=None), header="WWW-Authenticate")
    f.check(ScopeError, [f.v2("lin", good, token=read_only),
                         f.predict("lin", x.tolist(), token=read_only)],
            f.grpc(_raw_request([1, 4], x.tobytes()), token=read_only))

    first = g.stub.ModelInfer.future(_raw_request([1, 4], x.tobytes()), metadata=g.metadata())
    wait_for_queue_depth(g, 1)  # queued, waiting 3 s for its batch to fill: the queue is full
    f.check(QueueFull, [f.v2("lin", good), f.predict("lin", x.tolist())],
            f.grpc(_raw_request([1, 4], x.tobytes())), header="Retry-After")
    np.testing.assert_allclose(np.frombuffer(first.result(timeout=10).raw_output_contents[0],
                                             "<f4"), g.expected(x)[0][0], rtol=1e-6, atol=1e-6)
