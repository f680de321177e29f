"""The gRPC face of the Open Inference Protocol: a thin servicer over the data plane, the
twin of the REST face (http/v2.py) — same lookups, checks, API key scopes, counters and
errors, each answered with the gRPC code and trailing metadata of server/errors.py's table.

It runs as a grpc.aio server on the event loop that serves HTTP (`start_grpc` is awaited in
the app's lifespan), so both faces share one data plane and its batchers: a batch can hold
REST and gRPC requests together.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import grpc

from optiserve.core.errors import ConfigError, OptiserveError
from optiserve.server.auth import token_of
from optiserve.server.dataplane import InferRequest, Payload
from optiserve.server.errors import error_headers, face, internal, translated
from optiserve.server import tls
from optiserve.server.grpc import codec
from optiserve.server.grpc import inference_pb2 as pb
from optiserve.server.grpc.inference_pb2_grpc import (GRPCInferenceServiceServicer,
                                                      add_GRPCInferenceServiceServicer_to_server)

log = logging.getLogger("optiserve.server")

_MAX_MESSAGE = 2**31 - 1  # gRPC takes message limits as a C int


def _answers_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Turn what a handler raises into a gRPC status: optiserve's errors with their code and
    message, our own bugs logged and answered INTERNAL; the server keeps serving."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:  # a full disk is said; our bug is logged, answered INTERNAL
            known = exc if isinstance(exc, OptiserveError) else translated(exc)
            if not isinstance(known, OptiserveError):
                await context.abort(grpc.StatusCode.INTERNAL,
                                    internal(exc, f"gRPC {method.__name__}"))
            trailing = tuple((k.lower(), v) for k, v in error_headers(known).items())
            await context.abort(face(known).grpc, str(known), trailing_metadata=trailing)

    return handler


class InferenceServicer(GRPCInferenceServiceServicer):
    """GRPCInferenceService over a DataPlane. Health and server metadata need no key; the
    rest need the scopes the REST face asks for the same thing."""

    def __init__(self, plane, keys, settings):
        self.plane, self.keys = plane, keys
        self.auth = settings.auth == "on"

    # -- health and metadata --------------------------------------------------------------------
    @_answers_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_answers_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    @_answers_errors
    async def ServerMetadata(self, request, context):
        return codec.server_metadata(self.plane.server_metadata())

    @_answers_errors
    async def ModelReady(self, request, context):
        """Not served (unknown, or still loading) is `ready: false`, not an error, as on
        Triton; a wrong key still is one."""
        self._auth(context, "read", "infer")
        try:
            self.plane.get(request.name, request.version or None)
        except OptiserveError as exc:
            if face(exc).grpc not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_answers_errors
    async def ModelMetadata(self, request, context):
        self._auth(context, "read", "infer")
        return codec.model_metadata(self.plane.metadata(request.name, request.version or None))

    @_answers_errors
    async def ModelConfig(self, request, context):
        self._auth(context, "read", "infer")
        return codec.model_config(self.plane.config(request.name, request.version or None))

    @_answers_errors
    async def ModelStatistics(self, request, context):
        self._auth(context, "read", "infer")
        return codec.model_statistics(self.plane.stats(request.name, request.version))

    # -- model repository -------------------------------------------------------------------------
    @_answers_errors
    async def RepositoryIndex(self, request, context):
        self._auth(context, "read")
        return codec.repository_index(await self.plane.index(), request.ready)

    @_answers_errors
    async def RepositoryModelLoad(self, request, context):
        """Create or change the deployment `model_name` (settings from the "config"
        parameter over the current ones) and load it; what served before serves on if the
        load fails."""
        self._auth(context, "models:write")
        await self.plane.deploy(request.model_name, codec.load_overrides(request))
        return pb.RepositoryModelLoadResponse()

    @_answers_errors
    async def RepositoryModelUnload(self, request, context):
        self._auth(context, "models:write")
        await self.plane.unload_kept(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference --------------------------------------------------------------------------------
    @_answers_errors
    async def ModelInfer(self, request, context):
        """Decode for the data plane, encode its answer; it counts the request (one refused
        for its key here, under `_unknown`)."""
        try:
            self._auth(context, "infer")
        except OptiserveError as exc:
            self.plane.refused("grpc", exc)
            raise
        response = await self.plane.infer(InferRequest(
            request.model_name, lambda _served: _payload(request),
            request.model_version or None, "grpc", deadline_s=context.time_remaining()))
        return codec.infer_response(response.model, response.version, request.id,
                                    response.outputs, codec.requested_outputs(request))

    # -- API keys ---------------------------------------------------------------------------------
    def _auth(self, context: grpc.aio.ServicerContext, *any_of: str) -> None:
        """The key in `authorization: Bearer osk_...` (or `x-api-key`) has one of the scopes
        (401 / 403 otherwise), as on REST."""
        if self.auth:
            self.keys.verify(token_of(context.invocation_metadata() or ()), *any_of)


async def start_grpc(plane, keys, settings, *, host: str) -> grpc.aio.Server:
    """A started grpc.aio server for `plane` on host:settings.grpc_port, on the running event
    loop. Messages may be as large as REST inference bodies (OPTISERVE_MAX_REQUEST_MB)."""
    limit = min(int(settings.max_request_mb * 1e6), _MAX_MESSAGE)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # without this, Linux lets a second server bind the port and share its traffic
        ("grpc.so_reuseport", 0),
    ])
    add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(plane, keys, settings), server)
    address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
    credentials = tls.grpc_credentials(settings)
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if not bound:
        await server.stop(None)
        raise ConfigError(f"The gRPC port {settings.grpc_port} cannot be bound on {host}: it "
                          "is in use, or the address is not this machine's.",
                          hint="Choose another port with OPTISERVE_GRPC_PORT or `optiserve "
                          "serve --grpc-port PORT` (0 turns gRPC off).")
    await server.start()
    log.info("Open Inference Protocol over gRPC%s on %s", " (TLS)" if credentials else "",
             address)
    return server


def _payload(request) -> Payload:
    return Payload(codec.inputs(request), codec.requested_outputs(request) or None,
                   codec.timeout_s(request), request.id)
