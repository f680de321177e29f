"""What one request may cost the server: body limits enforced while the body streams in (not
after it has been stored), gzip/deflate bodies inflated in bounded steps off the event loop,
and a body that stops arriving cut off.

Two faces read bodies: `BodyLimit` (middleware in front of the management API, whose routes
read their bodies themselves) and `read_body` (the /v2 layer, which reads its own).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass

from optiserve.core.errors import BodyTimeout, OptiserveError, PayloadTooLarge
from optiserve.server.errors import http_status

_RATIO_FLOOR = 10_000_000  # a body that inflates to less than this is never a bomb worth refusing
_STEP = 1 << 22  # inflate at most 4 MiB per step, so a bomb is caught after one step


@dataclass(frozen=True)
class BodyRules:
    """The limits of one kind of request, with the setting that raises each."""

    max_bytes: int
    setting: str | None = "OPTISERVE_MAX_REQUEST_MB"  # None: a fixed limit
    max_ratio: float = 100.0

    def too_large(self) -> PayloadTooLarge:
        return too_large(self.max_bytes, self.setting)


def too_large(max_bytes: int,
              setting: str | None = "OPTISERVE_MAX_UPLOAD_MB") -> PayloadTooLarge:
    """The 413 of every face that reads a body (this middleware, the /v2 layer)."""
    return PayloadTooLarge(f"The request body is larger than the limit of "
                           f"{max_bytes / 1e6:g} MB.",
                           hint="Send a smaller body (a smaller file, fewer rows)"
                           + (f", or raise {setting} on the server." if setting else "."))


class Watchdog:
    """Cuts off body reads that wait longer than `idle_s` for the next chunk. One sweep a
    second over the reads in progress, instead of a timer per read: a read costs a dict entry
    (asyncio.wait_for would cost a task per chunk, on the hot path of every inference)."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._waiting: dict[asyncio.Task, float] = {}
        self._late: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    async def receive(self, receive):
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        self._waiting[task] = loop.time()
        try:
            return await receive()
        except asyncio.CancelledError:
            if task not in self._late:
                raise
            self._late.discard(task)
            task.uncancel()
            raise BodyTimeout(f"No part of the request body arrived for {self.idle_s:g} s; "
                              "the request is dropped.",
                              hint="Send the body without pauses.") from None
        finally:
            self._waiting.pop(task, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            await asyncio.sleep(min(1.0, self.idle_s / 2))
            now = loop.time()
            for task, since in list(self._waiting.items()):
                if now - since > self.idle_s and task not in self._late:
                    self._late.add(task)
                    task.cancel()


async def read_body(scope, receive, rules: BodyRules, watchdog: Watchdog) -> bytes:
    """The whole body of a request, inflated if it is gzip/deflate; 413 past the limit (by
    Content-Length before anything is read), 408 when no chunk comes for the watchdog's
    time."""
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > rules.max_bytes:
        raise rules.too_large()
    encoding = headers.get(b"content-encoding")
    inflater = _Inflater(encoding, rules) if encoding in (b"gzip", b"deflate") else None
    chunks, size = [], 0
    while True:
        message = await watchdog.receive(receive)
        if message["type"] == "http.disconnect":
            raise OptiserveError("The client left before the body arrived.")
        chunk = message.get("body", b"")
        if inflater is not None and chunk:
            chunk = await inflater.feed(chunk)
        size += len(chunk)
        if size > rules.max_bytes:
            raise rules.too_large()
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    if inflater is not None:
        inflater.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Inflater:
    """gzip/deflate in bounded steps: never more than the size limit, nor (past 10 MB) more
    than `max_ratio` times the compressed bytes; each step in a thread (zlib releases the
    GIL), so the event loop answers other requests meanwhile."""

    def __init__(self, encoding: bytes, rules: BodyRules):
        self.name, self.rules = encoding.decode(), rules
        self._z = zlib.decompressobj(wbits=31 if encoding == b"gzip" else 15)
        self.taken = self.given = 0

    def _allowed(self) -> int:
        ratio_cap = max(_RATIO_FLOOR, int(self.rules.max_ratio * self.taken))
        return min(self.rules.max_bytes, ratio_cap) - self.given

    def _step(self, data: bytes) -> bytes:
        out = []
        while True:
            allowed = self._allowed()
            try:
                piece = self._z.decompress(data, min(_STEP, allowed + 1))
            except zlib.error as exc:
                raise OptiserveError(f"The {self.name} body does not decompress ({exc}).",
                                     hint="Send the body as it was compressed, or without "
                                     "Content-Encoding.") from None
            self.given += len(piece)
            out.append(piece)
            if len(piece) > allowed:
                if self.given > self.rules.max_bytes:
                    raise self.rules.too_large()
                raise PayloadTooLarge(
                    f"The {self.name} body inflates more than {self.rules.max_ratio:g} times "
                    "its compressed size, as a decompression bomb does.",
                    hint="Send it uncompressed, or raise OPTISERVE_MAX_INFLATE_RATIO on the "
                    "server.")
            data = self._z.unconsumed_tail
            if not data:
                return b"".join(out)

    async def feed(self, chunk: bytes) -> bytes:
        self.taken += len(chunk)
        if len(chunk) < 65536 and self.taken * self.rules.max_ratio < _STEP:
            return self._step(chunk)  # small: not worth a thread hop
        return await asyncio.to_thread(self._step, chunk)

    def finish(self) -> None:
        if not self._z.eof:
            raise OptiserveError(f"The {self.name} body ends before its compressed data does.",
                                 hint="Send the whole compressed body.")


class BodyLimit:
    """Pure ASGI middleware for the routes that read their own bodies: 413 when Content-Length
    or the bytes received pass `max_bytes`, 408 when the watchdog cuts a read off."""

    def __init__(self, app, max_bytes: int, watchdog: Watchdog):
        self.app, self.max_bytes, self.watchdog = app, max_bytes, watchdog

    async def _refuse(self, send, refusal: OptiserveError) -> None:
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
            return await self._refuse(send, too_large(self.max_bytes))
        # A body without Content-Length (chunked) is counted as it arrives: past the limit (or
        # its time) the app is told the client left, whatever it answers is dropped, and the
        # refusal goes out instead.
        received, refusal, started, done = 0, None, False, False

        async def limited():
            nonlocal received, refusal, done
            if refusal is not None:
                return {"type": "http.disconnect"}
            if done:  # the body is read: what comes now is the client leaving
                return await receive()
            try:
                message = await self.watchdog.receive(receive)
            except BodyTimeout as exc:
                refusal = exc
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body")
                if received > self.max_bytes:
                    refusal = too_large(self.max_bytes)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refusal is not None:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await self._refuse(send, refusal)
