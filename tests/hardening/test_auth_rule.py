"""One rule for where the API key is read, on every face (issue 16, item 7): a Bearer token
wins; without one, X-API-Key; an Authorization header of another scheme is not read. Before,
`Authorization: Token x` beside a valid X-API-Key was 401 on /v2 and 200 on /api/v1."""

from __future__ import annotations

import grpc
import pytest

from optiserve.server.grpc import inference_pb2 as pb


def _combos(good: str) -> dict[str, tuple[dict, int]]:
    """name -> (headers, the status every face answers)."""
    return {
        "other scheme beside a valid X-API-Key": (
            {"authorization": "Token nope", "x-api-key": good}, 200),
        "Basic beside a valid X-API-Key": (
            {"authorization": "Basic dXNlcjpwdw==", "x-api-key": good}, 200),
        "wrong Bearer beside a valid X-API-Key": (
            {"authorization": "Bearer osk_nope_nope", "x-api-key": good}, 401),
        "valid Bearer beside a wrong X-API-Key": (
            {"authorization": f"Bearer {good}", "x-api-key": "osk_nope_nope"}, 200),
        "lower-case bearer": ({"authorization": f"bearer {good}"}, 200),
        "only another scheme": ({"authorization": f"Token {good}"}, 401),
        "only X-API-Key": ({"x-api-key": good}, 200),
        "nothing": ({}, 401),
    }


@pytest.mark.slow
def test_every_face_reads_the_key_by_one_rule(serve):
    g = serve()
    key = g.live.key("read")
    grpc_code = {200: grpc.StatusCode.OK, 401: grpc.StatusCode.UNAUTHENTICATED}
    for what, (headers, status) in _combos(key).items():
        c = g.live.client(token=None, headers=headers)
        for path in ("/api/v1/models", "/v2/models/lin", "/v2/models/lin/config"):
            r = c.get(path)
            assert r.status_code == status, (what, path, r.status_code, r.text)
            if status == 401:
                assert "error" in r.json() and r.headers["www-authenticate"] == "Bearer"
        try:
            g.stub.ModelMetadata(pb.ModelMetadataRequest(name="lin"),
                                 metadata=tuple(headers.items()))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        assert code == grpc_code[status], (what, "gRPC", code)
