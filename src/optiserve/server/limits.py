"""Request body limit, enforced while the body streams in (not after it has been stored)."""

from __future__ import annotations

import json

from optiserve.core.errors import PayloadTooLarge
from optiserve.server.errors import http_status


def too_large(max_bytes: int) -> PayloadTooLarge:
    """The 413 of every face that reads a body (this middleware, the /v2 layer)."""
    return PayloadTooLarge(f"The request body is larger than the limit of "
                           f"{max_bytes / 1e6:g} MB.",
                           hint="Send a smaller body (a smaller file, fewer rows), or raise "
                           "OPTISERVE_MAX_UPLOAD_MB on the server.")


class BodyLimit:
    """Pure ASGI middleware: 413 when Content-Length or the bytes received pass `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send) -> None:
        refusal = too_large(self.max_bytes)
        body = json.dumps({"error": str(refusal)}).encode()
        await send({"type": "http.response.start", "status": http_status(refusal),
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        # A body without Content-Length (chunked) is counted as it arrives: past the limit the
        # app is told the client left, whatever it answers is dropped, and 413 goes out instead.
        received, over, started = 0, False, False

        async def limited():
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send)
