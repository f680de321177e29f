"""Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor, model
repository, model configuration and statistics extensions; plus Prometheus `/metrics`.

It is a pure ASGI layer in front of the FastAPI app: `/v2/...` and `/metrics` are answered
here, without FastAPI's routing, validation and response models, because on small models the
per-request cost of HTTP handling *is* the latency. Everything else passes through to the app.
Errors have the same `{"error": "..."}` shape and statuses as the rest of the server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import orjson

from optiserve.core.errors import OptiserveError, PayloadTooLarge
from optiserve.server.auth import token_of
from optiserve.server.dataplane import InferRequest, InferResponse, Payload
from optiserve.server.errors import (MethodNotAllowed, error_headers, http_status, internal,
                                     translated)
from optiserve.server.limits import BodyRules, Watchdog, read_body
from optiserve.server.tensors import (TensorError, datatype, from_binary, from_json, json_data,
                                     to_bytes)

log = logging.getLogger("optiserve.server")

_HEADER_LENGTH = b"inference-header-content-length"
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/stats)?$")
_REPO = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")
_JSON = [(b"content-type", b"application/json")]
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_BIG = 1 << 20  # bodies from this size are parsed in a thread


class OIPRest:
    """Pure ASGI middleware: serves /v2 and /metrics, passes the rest to `app`."""

    def __init__(self, app, *, plane, keys, settings, watchdog: Watchdog):
        self.app, self.plane, self.keys = app, plane, keys
        self.auth = settings.auth == "on"
        self.infer_body = BodyRules(int(settings.max_request_mb * 1e6),
                                    max_ratio=settings.max_inflate_ratio)
        self.small_body = BodyRules(1_000_000, setting=None)  # repository requests
        self.watchdog = watchdog
        self.max_json = int(settings.max_json_mb * 1e6)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not (path.startswith("/v2") or path == "/metrics"):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        try:
            status, body, headers = await self._route(scope, receive, path, started)
        except OptiserveError as exc:
            status, body, headers = _refusal(exc)
        except Exception as exc:  # a full disk is said; our bug is logged, answered 500
            known = translated(exc)
            if isinstance(known, OptiserveError):
                status, body, headers = _refusal(known)
            else:
                status, headers = 500, list(_JSON)
                body = orjson.dumps({"error": internal(exc, f"{scope['method']} {path}")})
        headers.append((b"content-length", str(len(body)).encode()))
        if status in (408, 413):  # the body was not read to its end: the connection goes
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- routing ------------------------------------------------------------------------------
    async def _route(self, scope, receive, path: str, started: float):
        method = scope["method"]
        if path == "/v2/health/live":
            return 200, b'{"live":true}', list(_JSON)
        if path == "/v2/health/ready":
            if self.plane.ready():
                return 200, b'{"ready":true}', list(_JSON)
            return 503, orjson.dumps({"ready": False, "error": "Not every deployment is loaded; "
                                      "see POST /v2/repository/index."}), list(_JSON)
        if path == "/metrics":
            self._auth(scope, "read", "infer")
            body, content_type = self.plane.metrics.render()
            return 200, body, [(b"content-type", content_type.encode())]
        if path == "/v2/models/stats":  # before _MODEL, which would read "stats" as a name
            self._method(method, "GET")
            self._auth(scope, "read", "infer")
            return self._json({"model_stats": self.plane.stats()})
        m = _MODEL.match(path)
        if m:
            name, version, action = m.group(1), m.group(2), m.group(3) or ""
            if action == "/infer":
                try:
                    self._method(method, "POST")
                    self._auth(scope, "infer")
                except OptiserveError as exc:
                    self.plane.refused("rest", exc)
                    raise
                return await self._infer(scope, receive, name, version, started)
            self._method(method, "GET")
            self._auth(scope, "read", "infer")
            if action == "/stats":
                return self._json({"model_stats": self.plane.stats(name, version)})
            if action == "/ready":
                self.plane.get(name, version)
                return self._json({"name": name, "ready": True})
            if action == "/config":
                return self._json(self.plane.config(name, version))
            return self._json(self.plane.metadata(name, version))
        if path == "/v2/repository/index":
            self._method(method, "POST")
            self._auth(scope, "read")
            body = await read_body(scope, receive, self.small_body, self.watchdog)
            query = _json_body(body, "The index request", '{"ready": true}')
            index = await self.plane.index()
            if query.get("ready"):
                index = [e for e in index if e["state"] == "READY"]
            return self._json(index)
        m = _REPO.match(path)
        if m:
            self._method(method, "POST")
            self._auth(scope, "models:write")
            body = await read_body(scope, receive, self.small_body, self.watchdog)
            return await self._repository(m.group(1), m.group(2), body)
        if path in ("/v2", "/v2/"):
            self._method(method, "GET")
            return self._json(self.plane.server_metadata())
        return 404, orjson.dumps({"error": f"No endpoint {path}. The inference protocol lives "
                                  "under /v2 (see the Open Inference Protocol); the management "
                                  "API under /api/v1 (/docs)."}), list(_JSON)

    @staticmethod
    def _json(data) -> tuple:
        return 200, orjson.dumps(data, option=_NUMPY), list(_JSON)

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise MethodNotAllowed(method, allowed)

    def _auth(self, scope, *any_of: str) -> None:
        if self.auth:
            self.keys.verify(token_of((k.decode("latin-1"), v.decode("latin-1"))
                                      for k, v in scope["headers"]), *any_of)

    async def _repository(self, name: str, action: str, body: bytes):
        if action == "unload":
            await self.plane.unload_kept(name)
            return self._json({})
        hint = '{"parameters": {"config": "{...deployment settings...}"}}'
        request = _json_body(body, "The load request", hint)
        params = request.get("parameters") or {}
        if not isinstance(params, dict):
            raise OptiserveError("The load request's 'parameters' must be a JSON object.",
                                 hint=f"Send {hint}.")
        config = params.get("config") or "{}"
        overrides = _json_body(config.encode(), "parameters.config", hint) \
            if isinstance(config, str) else config
        if not isinstance(overrides, dict):
            raise OptiserveError("parameters.config must be a JSON object of "
                                 "deployment settings (max_batch_size, instances, ...).")
        served = await self.plane.deploy(name, overrides)
        return self._json({"name": name, "versions": [s.version for s in served]})

    # -- inference ------------------------------------------------------------------------------
    async def _infer(self, scope, receive, name: str, version: str | None, started: float):
        """Decode for the data plane, encode its answer; it counts the request."""
        try:
            body = await read_body(scope, receive, self.infer_body, self.watchdog)
            # A large body is parsed in a thread, so the loop answers between its steps.
            parsed = _decode(scope, body, self.max_json) if len(body) < _BIG else \
                await asyncio.to_thread(_decode, scope, body, self.max_json)
        except OptiserveError as exc:  # raised by decode: counted under the version too
            parsed = exc
        wanted: list[tuple[str, bool]] = []
        binary = [False]

        def decode(_served) -> Payload:  # in infer: a mistake counts under its version
            if isinstance(parsed, OptiserveError):
                raise parsed
            request, inputs, asked, binary[0], timeout_s = parsed
            wanted.extend(asked)
            return Payload(inputs, [w[0] for w in asked] or None, timeout_s,
                           request.get("id") if "id" in request else None)

        response = await self.plane.infer(InferRequest(name, decode, version, "rest",
                                                       received=started))
        return _response(response, wanted, binary[0])


def _refusal(exc: OptiserveError) -> tuple[int, bytes, list]:
    """Status, body and headers of an optiserve error, from server/errors.py's table."""
    extra = [(k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()]
    return http_status(exc), orjson.dumps({"error": str(exc)}), _JSON + extra


def _json_body(body: bytes, what: str, example: str) -> dict:
    """A small JSON-object body (repository requests); empty means {}."""
    try:
        value = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise OptiserveError(f"{what} is not valid JSON ({exc}).",
                             hint=f"Send a JSON object, e.g. {example}.") from None
    if not isinstance(value, dict):
        raise OptiserveError(f"{what} must be a JSON object, e.g. {example}.")
    return value


def _header(scope, key: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == key:
            return v
    return None


def _decode(scope, body: bytes, max_json: int) -> tuple:
    request, raw = _split(scope, body, max_json)
    return (request, *_parse(request, raw))


def _split(scope, body: bytes, max_json: int) -> tuple[dict, memoryview]:
    """The JSON request and, with the binary extension, the raw bytes after it."""
    length = _header(scope, _HEADER_LENGTH)
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise TensorError(f"Inference-Header-Content-Length is {length.decode(errors='replace')!r} "
                              f"but the body has {len(body)} bytes.",
                              hint="It must give the length of the JSON header that starts "
                              "the body.")
        n = int(length)
        header, raw = body[:n], memoryview(body)[n:]
    else:
        header, raw = body, memoryview(b"")
    if len(header) > max_json:
        raise PayloadTooLarge(
            f"The request's JSON is {len(header) / 1e6:.1f} MB; at most {max_json / 1e6:g} MB "
            "of JSON is parsed in one request.",
            hint="Send large tensors as binary data (Triton's binary tensor extension: "
            "tritonclient's binary_data=True, or gRPC), or raise OPTISERVE_MAX_JSON_MB on "
            "the server.")
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise TensorError(f"The inference request is not valid JSON ({exc}).",
                          hint="Send {\"inputs\": [{\"name\", \"shape\", \"datatype\", "
                          "\"data\"}]}.") from None
    if not isinstance(request, dict):
        raise TensorError("The inference request must be a JSON object with 'inputs'.")
    return request, raw


def _parse(request: dict, raw: memoryview):
    """(inputs {name: (array, datatype)}, wanted [(name, binary?)], binary default, timeout)."""
    entries = request.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise TensorError("The request has no 'inputs' list.",
                          hint="Send {\"inputs\": [{\"name\", \"shape\", \"datatype\", "
                          "\"data\"}]}.")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("Request 'parameters' must be a JSON object.")
    inputs, offset = {}, 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TensorError("Each input must be an object with a 'name'.")
        name = entry["name"]
        if name in inputs:
            raise TensorError(f"Input '{name}' is given twice.")
        iparams = entry.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(raw):
                raise TensorError(f"Input '{name}' says binary_data_size {size!r} but "
                                  f"{len(raw) - offset} bytes of binary data are left.",
                                  hint="Each binary input's bytes follow the JSON header in "
                                  "order of the inputs.")
            array = from_binary(name, entry.get("shape"), entry.get("datatype"),
                                raw[offset:offset + size])
            offset += size
        elif "data" in entry:
            array = from_json(name, entry.get("shape"), entry.get("datatype"), entry["data"])
        else:
            raise TensorError(f"Input '{name}' has neither 'data' nor a binary_data_size "
                              "parameter.")
        inputs[name] = (array, entry["datatype"])
    if offset != len(raw):
        raise TensorError(f"{len(raw) - offset} bytes of binary data follow the inputs but no "
                          "input claims them.",
                          hint="Set binary_data_size on each binary input.")
    default_binary = bool(params.get("binary_data_output", False))
    wanted = []
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise TensorError("The request's 'outputs' must be a list of {\"name\": ...} objects.")
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TensorError("Each requested output must be an object with a 'name'.")
        oparams = entry.get("parameters") or {}
        wanted.append((entry["name"], bool(oparams.get("binary_data", default_binary))
                       if isinstance(oparams, dict) else default_binary))
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
        raise TensorError(f"Parameter 'timeout' is {timeout!r}; it is a number of "
                          "microseconds.")
    return inputs, wanted, default_binary, (None if timeout is None else timeout / 1e6)


def _response(response: InferResponse, wanted: list[tuple[str, bool]], binary_default: bool):
    outputs, blobs = [], []
    names = wanted or [(n, binary_default) for n in response.outputs]
    for name, binary in names:
        array = response.outputs[name]
        entry = {"name": name, "datatype": datatype(array.dtype), "shape": list(array.shape)}
        if binary:
            blob = to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(array)
        outputs.append(entry)
    served = response.served
    body = {"model_name": served.name, "model_version": served.version, "outputs": outputs}
    if response.id is not None:
        body["id"] = response.id
    header = orjson.dumps(body, option=_NUMPY)
    if not blobs:
        return 200, header, list(_JSON)
    return 200, b"".join([header, *blobs]), [
        (b"content-type", b"application/octet-stream"),
        (_HEADER_LENGTH, str(len(header)).encode())]

