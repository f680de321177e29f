"""Request body limit, enforced while the body streams in (not after it has been stored)."""

from __future__ import annotations

import json

from optiserve.core.errors import PayloadTooLarge


class BodyLimit:
    """Pure ASGI middleware: 413 when Content-Length or the bytes received pass `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the limit of "
                               f"{self.max_bytes / 1e6:g} MB.",
                               hint="Raise OPTISERVE_MAX_UPLOAD_MB on the server, or send a "
                               "smaller file.")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            body = json.dumps({"error": str(self._error())}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body without Content-Length
                    raise self._error()
            return message

        await self.app(scope, limited, send)
