"""The one table from an error class to what every face answers for it: the HTTP status (the
management API, /api/v1/.../predict and the /v2 REST layer), the gRPC code, and the headers
that go with it (gRPC sends them as trailing metadata, in lower case).

Errors carry what went wrong and the fix (core/errors.py and the modules that raise them);
they know no protocol. `face(exc)` walks the class's MRO, as Starlette's exception handlers
do, so a subclass answers as its nearest listed ancestor; anything not an OptiserveError ends
at `Exception`: our bug, 500 / INTERNAL.
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from grpc import StatusCode

from optiserve.core.errors import (ArtifactNotFound, AuthError, BodyTimeout, ConflictError,
                                   GateFailedError, ModelNotFound, OptimizationTimeout,
                                   OptiserveError, PayloadTooLarge, RunNotFound, ScopeError,
                                   StorageFull, UnsupportedUpload)
from optiserve.exporters.base import ExportError
from optiserve.registry.deployments import DeploymentNotFound
from optiserve.server.batching import ModelFailed, ModelUnavailable, QueueFull, RequestTimeout
from optiserve.server.served import LoadFailed

Headers = Callable[[BaseException], dict[str, str]]
log = logging.getLogger("optiserve.server")


class MethodNotAllowed(OptiserveError):
    """An HTTP method a /v2 endpoint does not take; `allowed` is the one it does."""

    def __init__(self, method: str, allowed: str):
        super().__init__(f"Method {method} is not allowed here; use {allowed}.")
        self.method, self.allowed = method, allowed


@dataclass(frozen=True)
class Face:
    """What a face answers for an error: HTTP status, gRPC code, extra headers."""

    http: int
    grpc: StatusCode
    headers: Headers | None = None


def _retry_after(exc: QueueFull) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after_s)}


def _bearer(_: BaseException) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"}


def _allow(exc: MethodNotAllowed) -> dict[str, str]:
    return {"Allow": exc.allowed}


_C = StatusCode
TABLE: dict[type[BaseException], Face] = {
    OptiserveError: Face(400, _C.INVALID_ARGUMENT),  # the caller's to fix
    ModelNotFound: Face(404, _C.NOT_FOUND),
    DeploymentNotFound: Face(404, _C.NOT_FOUND),
    RunNotFound: Face(404, _C.NOT_FOUND),
    ArtifactNotFound: Face(404, _C.NOT_FOUND),
    AuthError: Face(401, _C.UNAUTHENTICATED, _bearer),
    ScopeError: Face(403, _C.PERMISSION_DENIED),
    MethodNotAllowed: Face(405, _C.UNIMPLEMENTED, _allow),
    OptimizationTimeout: Face(408, _C.INVALID_ARGUMENT),  # a job's, never on gRPC
    BodyTimeout: Face(408, _C.DEADLINE_EXCEEDED),  # REST only
    ConflictError: Face(409, _C.FAILED_PRECONDITION),
    PayloadTooLarge: Face(413, _C.INVALID_ARGUMENT),
    UnsupportedUpload: Face(415, _C.INVALID_ARGUMENT),
    GateFailedError: Face(422, _C.INVALID_ARGUMENT),
    ExportError: Face(422, _C.INVALID_ARGUMENT),
    QueueFull: Face(429, _C.RESOURCE_EXHAUSTED, _retry_after),
    ModelFailed: Face(500, _C.INTERNAL),
    ModelUnavailable: Face(503, _C.UNAVAILABLE),
    RequestTimeout: Face(504, _C.DEADLINE_EXCEEDED),
    StorageFull: Face(507, _C.RESOURCE_EXHAUSTED),
    Exception: Face(500, _C.INTERNAL),  # not ours to explain: logged by the face
}


def _unwrap(error: BaseException | type[BaseException]):
    """An error that wraps another (LoadFailed.cause) answers as the one it wraps."""
    while isinstance(error, LoadFailed):
        error = error.cause
    return error


def face(error: BaseException | type[BaseException]) -> Face:
    """The row of an error (or error class): its own, else its nearest ancestor's."""
    error = _unwrap(error)
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        row = TABLE.get(klass)
        if row is not None:
            return row
    return TABLE[Exception]  # BaseException subclasses outside Exception


def http_status(error: BaseException | type[BaseException]) -> int:
    return face(error).http


def error_headers(error: BaseException) -> dict[str, str]:
    """The extra headers of an error's answer (Retry-After, WWW-Authenticate)."""
    error = _unwrap(error)
    row = face(error)
    return row.headers(error) if row.headers else {}


_FULL = (errno.ENOSPC, errno.EDQUOT)


def translated(exc: BaseException) -> BaseException:
    """What a face answers for an exception that is not optiserve's: a full disk (an OSError,
    or the database's "disk is full" wrapped by SQLAlchemy) is a StorageFull the operator can
    act on; anything else stays as it is (our bug: `internal`)."""
    for err in (exc, getattr(exc, "orig", None), exc.__cause__):
        if isinstance(err, OSError) and err.errno in _FULL:
            return StorageFull()
        if err is not None and "database or disk is full" in str(err):
            return StorageFull()
    return exc


def internal(exc: BaseException, where: str) -> str:
    """Log an unexpected error under a short reference; the message the client gets names its
    type and the reference, never its text (it may hold the server's paths or SQL)."""
    ref = secrets.token_hex(4)
    log.error("internal error %s on %s", ref, where, exc_info=exc)
    return (f"Internal error ({type(exc).__name__}, reference {ref}); it is logged on the "
            "server.")
