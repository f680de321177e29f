"""One error shape for every HTTP failure: a 4xx/5xx status with {"error": "..."}.

optiserve's own errors answer what server/errors.py's table says for their class (status and
headers, e.g. Retry-After, WWW-Authenticate); request validation becomes 400
(malformed JSON) or 422 (a field that is wrong, missing or unknown), naming the field.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException

from optiserve.core.errors import OptiserveError, first_line
from optiserve.server.errors import error_headers, http_status, internal, translated


def error_response(code: int, message: str, *, headers: dict[str, str] | None = None,
                   **extra) -> JSONResponse:
    """{"error": message, **extra} with HTTP status `code`."""
    return JSONResponse({"error": message, **extra}, status_code=code, headers=headers)


def _field(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(loc) or "body"


async def _optiserve(_: Request, exc: OptiserveError) -> JSONResponse:
    return error_response(http_status(exc), str(exc), headers=error_headers(exc))


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "not valid JSON")
        return error_response(400, f"The request body is not valid JSON: {reason}.")
    first = errors[0]
    if first.get("type") == "extra_forbidden":
        message = f"Unknown field '{_field(first)}'."
    elif first.get("type") == "missing":
        message = f"Field '{_field(first)}' is required."
    else:
        message = f"Field '{_field(first)}' is invalid: {first.get('msg')}."
    details = [{"field": _field(e), "message": e.get("msg"), "type": e.get("type")}
               for e in errors[:20]]
    return error_response(422, message + " See /docs for the request schema.",
                          details=details)


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    known = translated(exc)  # FastAPI's 400 for a body it could not store on a full disk
    if isinstance(known, OptiserveError):
        return await _optiserve(request, known)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = "No such endpoint. See /docs for the API."
    response = error_response(exc.status_code, message)
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _data(_: Request, exc: DataError) -> JSONResponse:
    """A value the database cannot take (a NUL byte in an id on PostgreSQL)."""
    return error_response(400, "A value in the request is not valid text for the registry "
                          f"({first_line(getattr(exc, 'orig', exc), 120)}).")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    known = translated(exc)
    if isinstance(known, OptiserveError):
        return await _optiserve(request, known)
    return error_response(500, internal(exc, f"{request.method} {request.url.path}"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(OptiserveError, _optiserve)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(DataError, _data)
    app.add_exception_handler(Exception, _unexpected)
