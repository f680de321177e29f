"""POST /api/v1/models/{name}/predict: the friendly face beside the Open Inference Protocol.

It takes what a user has at hand, turns it into the model's tensors, runs them through the
same data plane as /v2 and gRPC (`DataPlane.infer`, which splits a request larger than the
deployment's max_batch_size into batches of that size), and post-processes
what the deployment declares (`DeploymentSpec.predict`, registry/deployments.py):

* JSON `{"records": [{column: value, ...}, ...]}`: tabular rows, bound to the model's inputs
  by column name, or, for a model with one 2-D input, as its features (in the order the model
  was trained on when it recorded them, else in the order of the record's keys);
* JSON `{"inputs": {input_name: nested list}}`: tensors as nested lists (a single example
  without its batch dimension is taken as a batch of one);
* multipart/form-data with an image in `file`: decoded with Pillow (the `images` extra) and
  preprocessed as `predict.image` says, as a batch of one.

The answer is `{"model_name", "model_version", "predictions": [one per row]}`: with `top_k`
each prediction is `[{"label", "index", "score"}, ...]` best first; otherwise it is
`{output_name: value}` (softmax applied when declared). Decoding and preprocessing run in a
worker thread, never on the event loop. Every input mistake is a 4xx `{"error": ...}`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from optiserve.core.errors import (ConfigError, ConflictError, OptiserveError, UnsupportedUpload,
                                   first_line)
from optiserve.data.binding import feature_columns, quoted
from optiserve.core.types import TensorSpec
from optiserve.registry.deployments import ImageSpec, PredictSpec
from optiserve.server.auth import scope
from optiserve.server.dataplane import InferRequest, Payload
from optiserve.server.tensors import datatype

router = APIRouter(prefix="/api/v1", tags=["predict"])

MAX_PIXELS = 40_000_000  # decoded (and resized) images larger than this are refused
MAX_ROWS = 10_000  # records / rows per request
_MAX_DEPTH = 32  # nesting of the lists in one value

_JSON_HINT = ('Send JSON {"records": [{"column": value, ...}, ...]} or '
              '{"inputs": {"input_name": [[...], ...]}}, or an image as multipart/form-data '
              "in the field 'file'.")


class PredictError(OptiserveError):
    """A predict request that cannot be turned into the model's inputs."""


class UnsupportedContent(PredictError, UnsupportedUpload):
    """A body that is neither JSON nor an image upload."""


class PredictSettingsError(ConflictError):
    """The deployment's predict settings do not fit the model it serves."""


# -- OpenAPI ------------------------------------------------------------------------------
_RECORDS_EXAMPLE = {"records": [{"tenure": 12, "monthly_charges": 70.5, "support_calls": 2}]}
_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {
        "schema": {"type": "object", "additionalProperties": False, "properties": {
            "records": {"type": "array", "minItems": 1, "maxItems": MAX_ROWS,
                        "description": "Rows as objects {column: value}.",
                        "items": {"type": "object"}},
            "inputs": {"type": "object", "description": "Tensors by model input name, as "
                       "nested lists (rows first).",
                       "additionalProperties": {"type": "array"}}}},
        "examples": {"records": {"summary": "Tabular rows", "value": _RECORDS_EXAMPLE},
                     "inputs": {"summary": "Tensors", "value": {
                         "inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}}}},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "An image (PNG, JPEG, WebP, GIF, BMP, TIFF); needs the "
                     "deployment's predict.image settings."}}}}}}}
_RESPONSES = {200: {"description": "One prediction per row.", "content": {"application/json": {
    "examples": {
        "top_k": {"summary": "A classifier with top_k and labels", "value": {
            "model_name": "resnet", "model_version": "1", "predictions": [[
                {"label": "tabby cat", "index": 281, "score": 0.82},
                {"label": "tiger cat", "index": 282, "score": 0.11}]]}},
        "raw": {"summary": "Without post-processing: every output per row", "value": {
            "model_name": "churn", "model_version": "2", "predictions": [
                {"label": 1, "probabilities": [0.27, 0.73]}]}}}}}}}


@router.post("/models/{name}/predict", dependencies=[Depends(scope("infer", cached=True))],
             summary="Predict from JSON records or tensors, or from an image",
             openapi_extra=_BODY, responses=_RESPONSES)
async def predict(name: str, request: Request,
                  version: str | None = Query(None, max_length=32, description="A loaded "
                                              "version; default: the newest.")):
    """Runs through the same dynamic batcher as the inference protocol. JSON:
    `{"records": [...]}` or `{"inputs": {...}}`; an image as multipart/form-data in `file`
    (the deployment needs `predict.image` settings). Post-processing (softmax, top-k with
    labels) is the deployment's `predict` settings."""
    response = await request.app.state.plane.infer(InferRequest(
        name, lambda served: _decode(served, request), version, "predict", split=True))
    return Response(orjson.dumps({
        "model_name": response.model, "model_version": response.version,
        "predictions": _predictions(response.served, response.outputs, response.rows)}),
        media_type="application/json")


async def _decode(served, request: Request) -> Payload:
    """The request's body as the inputs of the version that answers it."""
    spec: PredictSpec | None = served.spec.predict
    if spec is not None:
        try:
            spec.check(served.signature)
        except ConfigError as exc:
            raise PredictSettingsError(
                f"Deployment '{served.name}' has predict settings that do not fit its model: "
                f"{exc.message}", hint=(exc.hint or "") + " Fix them with PUT "
                f"/api/v1/deployments/{served.name}.") from None
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        inputs = await _image_inputs(served, spec, request)
    elif ctype in ("", "application/json") or ctype.endswith("+json"):
        body = await request.body()
        inputs = await run_in_threadpool(_json_inputs, body, served)
    else:
        raise UnsupportedContent(f"Content-Type '{ctype}' is not taken here.", hint=_JSON_HINT)
    wanted = [spec.output_name(served.signature)] \
        if spec is not None and (spec.classifies() or spec.output) else None
    return Payload(inputs, wanted)


# -- post-processing ------------------------------------------------------------------------
def _predictions(served, result: dict[str, np.ndarray], rows: int | None) -> list:
    spec: PredictSpec | None = served.spec.predict
    if spec is not None and spec.classifies():
        name = spec.output_name(served.signature)
        return _classify(served, spec, name, result[name])
    per_row = rows is not None and all(a.ndim and a.shape[0] == rows for a in result.values())
    if not per_row:
        return [{n: _plain(a) for n, a in result.items()}]
    plain = {n: _plain(a) for n, a in result.items()}
    return [{n: v[r] for n, v in plain.items()} for r in range(rows)]


def _classify(served, spec: PredictSpec, name: str, out: np.ndarray) -> list:
    scores = np.asarray(out, dtype=np.float64)
    if scores.ndim == 1:  # a model without a batch dimension: one row
        scores = scores[None]
    if scores.ndim != 2:
        raise PredictSettingsError(f"Output '{name}' of model '{served.name}' has shape "
                                   f"{list(out.shape)}, not [rows, classes].",
                                   hint="Name the class score output with predict.output.")
    if spec.softmax:
        with np.errstate(over="ignore", invalid="ignore"):
            shifted = scores - scores.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            scores = exp / exp.sum(axis=1, keepdims=True)
    if spec.top_k is None:
        return [{name: row} for row in scores.tolist()]
    classes = scores.shape[1]
    labels = spec.labels
    if labels is None:
        recorded = served.info.meta.get("classes")
        if isinstance(recorded, list) and len(recorded) == classes:
            labels = [str(c) for c in recorded]
    if labels is not None and len(labels) != classes:
        raise PredictSettingsError(
            f"Deployment '{served.name}' has {len(labels)} labels but output '{name}' has "
            f"{classes} classes.", hint="Give one label per class, in index order, with PUT "
            f"/api/v1/deployments/{served.name}.")
    k = min(spec.top_k, classes)
    # NaN scores sort last; ties keep index order
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    out_rows = []
    for r, idx in enumerate(order.tolist()):
        out_rows.append([{"label": labels[i] if labels is not None else str(i), "index": i,
                          "score": scores[r, i].item()} for i in idx])
    return out_rows


def _plain(a: np.ndarray) -> Any:
    """Nested Python lists (strings for BYTES outputs); NaN becomes null in orjson."""
    if a.dtype.kind in "OSU":
        flat = [x.decode(errors="replace") if isinstance(x, bytes) else str(x)
                for x in a.reshape(-1)]
        return np.array(flat, dtype=object).reshape(a.shape).tolist()
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return a.tolist()


# -- JSON -----------------------------------------------------------------------------------
def _json_inputs(body: bytes, served) -> dict[str, tuple[np.ndarray, str]]:
    if not body.strip():
        raise PredictError("The request body is empty.", hint=_JSON_HINT)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PredictError(f"The request body is not valid JSON ({exc}).",
                           hint=_JSON_HINT) from None
    if not isinstance(payload, dict):
        raise PredictError(f"The request body is a JSON {_kind(payload)}, not an object.",
                           hint=_JSON_HINT)
    unknown = [k for k in payload if k not in ("records", "inputs")]
    if unknown:
        raise PredictError(f"Unknown field '{unknown[0]}' in the request.", hint=_JSON_HINT)
    if "records" in payload and "inputs" in payload:
        raise PredictError("The request has both 'records' and 'inputs'; send one of them.")
    if "records" in payload:
        return _from_records(payload["records"], served)
    if "inputs" in payload:
        return _from_inputs(payload["inputs"], served)
    raise PredictError("The request has neither 'records' nor 'inputs'.", hint=_JSON_HINT)


def _from_records(records: object, served) -> dict[str, tuple[np.ndarray, str]]:
    if not isinstance(records, list) or not records:
        raise PredictError("'records' must be a non-empty list of objects, one per row, "
                           f"e.g. {orjson.dumps(_RECORDS_EXAMPLE['records']).decode()}.")
    if len(records) > MAX_ROWS:
        raise PredictError(f"The request has {len(records)} records; at most {MAX_ROWS} are "
                           "taken at once.", hint="Split it into smaller requests.")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise PredictError(f"Record {i} is a JSON {_kind(r)}; each record is an object "
                               "{column: value}.")
    columns = list(dict.fromkeys(c for r in records for c in r))
    specs = served.signature.inputs
    names = [t.name for t in specs]
    feature_names = served.info.meta.get("feature_names")
    if all(n in columns for n in names):
        # one column per input, by name
        _no_unknown(columns, names, served, "inputs")
        _no_missing(records, names)
        out = {}
        for t in specs:
            array = _tensor([r[t.name] for r in records], t,
                            lambda p, n=t.name: f"column '{n}' of record {p[0]}")
            if array.ndim == len(t.shape) - 1 and t.shape[-1] in (1, -1):
                array = array.reshape(array.shape + (1,))  # one value per row for [-1, 1]
            out[t.name] = (array, datatype(t.dtype))
        return out
    if len(specs) == 1 and len(specs[0].shape) == 2:
        # the features of the model's one 2-D input (without recorded feature names, in the
        # order of the first record's keys)
        t = specs[0]
        order = feature_columns(columns, t, feature_names if isinstance(feature_names, list)
                                else None, "the records", strict=True,
                                fix=f"Send exactly {t.shape[1]} columns per record, in the "
                                "model's feature order (the model recorded no feature names, "
                                "so the order of the first record's keys is used).")
        _no_missing(records, order)
        array = _tensor([[r[c] for c in order] for r in records], t,
                        lambda p: f"column '{order[p[1]]}' of record {p[0]}"
                        if len(p) > 1 else f"record {p[0]}")
        return {t.name: (array, datatype(t.dtype))}
    missing = [n for n in names if n not in columns]
    unknown = [c for c in columns if c not in names]
    raise PredictError(
        f"Model '{served.name}' takes inputs {quoted(names)}; the records lack "
        f"{quoted(missing)}" + (f" and have unknown columns {quoted(unknown)}" if unknown
                                else "") + ".",
        hint="Give each record one column per model input, named as the input.")


def _no_unknown(columns: list[str], known: list[str], served, what: str) -> None:
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise PredictError(f"The records have unknown columns {quoted(unknown)}.",
                           hint=f"Model '{served.name}' {what}: {', '.join(known)}.")


def _no_missing(records: list[dict], columns: list[str]) -> None:
    for i, r in enumerate(records):
        missing = [c for c in columns if c not in r]
        if missing:
            raise PredictError(f"Record {i} lacks {quoted(missing)}.",
                               hint="Every record needs the same columns: "
                               + ", ".join(columns) + ".")


def _from_inputs(inputs: object, served) -> dict[str, tuple[np.ndarray, str]]:
    if not isinstance(inputs, dict) or not inputs:
        raise PredictError("'inputs' must be a non-empty object {input_name: nested list}.",
                           hint="The model's inputs: "
                           + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}"
                                       for t in served.signature.inputs) + ".")
    out = {}
    for name, data in inputs.items():
        t = served.inputs.get(name)
        if t is None:  # check() names it with the model's inputs
            out[name] = (np.zeros(0), "FP32")
            continue
        if not isinstance(data, list):
            data = [data]
        array = _tensor(data, t, lambda p, n=name: f"input '{n}' at index {list(p)}")
        if array.ndim == len(t.shape) - 1:
            array = array[None]  # one example without its batch dimension
        if array.size == 0:
            raise PredictError(f"Input '{name}' is empty.", hint="Send at least one row.")
        rows = array.shape[0] if array.ndim else 1
        if rows > MAX_ROWS:
            raise PredictError(f"Input '{name}' has {rows} rows; at most {MAX_ROWS} are taken "
                               "at once.", hint="Split it into smaller requests.")
        out[name] = (array, datatype(t.dtype))
    return out


def _tensor(data: list, spec: TensorSpec, where: Callable[[tuple], str]) -> np.ndarray:
    """Nested lists (rows first) checked value by value against the input's dtype."""
    shape = _shape(data, (), where)
    text = spec.dtype in ("str", "object")
    kind = "O" if text else np.dtype(spec.dtype).kind
    flat: list = []
    _leaves(data, (), kind, spec, where, flat)
    try:
        if text:
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
        else:
            array = np.asarray(flat, dtype=np.dtype(spec.dtype))
    except (OverflowError, ValueError, TypeError) as exc:
        raise PredictError(f"Input '{spec.name}': a value does not fit {spec.dtype} "
                           f"({first_line(exc)}).") from None
    if math.prod(shape) != array.size:  # cannot happen for a regular shape; belt and braces
        raise PredictError(f"Input '{spec.name}': the nested lists are not rectangular.")
    return array.reshape(shape)


def _shape(x: object, path: tuple, where) -> tuple[int, ...]:
    if not isinstance(x, list):
        return ()
    if len(path) >= _MAX_DEPTH:
        raise PredictError(f"The value at {where(path)} is nested more than {_MAX_DEPTH} "
                           "levels deep.")
    if not x:
        return (0,)
    first = _shape(x[0], path + (0,), where)
    for i in range(1, len(x)):
        if _shape(x[i], path + (i,), where) != first:
            raise PredictError(f"The lists at {where(path + (i,))} have a different length or "
                               "nesting than the others.",
                               hint="Every row needs the same number of values.")
    return (len(x),) + first


def _leaves(x: object, path: tuple, kind: str, spec: TensorSpec, where, out: list) -> None:
    if isinstance(x, list):
        for i, v in enumerate(x):
            _leaves(v, path + (i,), kind, spec, where, out)
        return
    out.append(_value(x, kind, spec, lambda: where(path)))


def _value(v: object, kind: str, spec: TensorSpec, where: Callable[[], str]) -> object:
    if kind == "f":
        if v is None:
            return math.nan  # a missing value: refused unless the deployment allows NaN
        if isinstance(v, (int, float)):
            return v
        want = "a number (null for a missing value)"
    elif kind in "iu":
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        want = "a whole number"
    elif kind == "b":
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
        want = "true or false"
    elif kind == "O":
        if isinstance(v, str):
            return v.encode()
        want = "a string"
    else:
        want = spec.dtype
    raise PredictError(f"The value at {where()} is {_show(v)}; model input '{spec.name}' "
                       f"({spec.dtype}) takes {want} there.",
                       hint="Encode the value as the model was trained (numbers for numeric "
                       "features).")


def _show(v: object) -> str:
    text = orjson.dumps(v).decode() if not isinstance(v, (bytes, bytearray)) else repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a JSON {_kind(v)})"


def _kind(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


# -- images ---------------------------------------------------------------------------------
async def _image_inputs(served, spec: PredictSpec | None, request: Request
                        ) -> dict[str, tuple[np.ndarray, str]]:
    if spec is None or spec.image is None:
        raise PredictError(
            f"Deployment '{served.name}' declares no image processing, so it does not take "
            "image uploads.",
            hint="Declare it with PUT /api/v1/deployments/" + served.name + ' {..., "predict": '
            '{"image": {"resize": 256, "crop": [224, 224], "mean": [0.485, 0.456, 0.406], '
            '"std": [0.229, 0.224, 0.225]}}}, or send JSON {"records": [...]} or '
            '{"inputs": {...}}.')
    try:
        form = await request.form(max_files=1, max_fields=8)
    except HTTPException as exc:  # Starlette's multipart parser: a malformed or crowded form
        raise PredictError(f"The form cannot be read: {exc.detail}",
                           hint="Send one image as multipart/form-data in the field 'file', "
                           "e.g. curl -F file=@cat.jpg ...") from None
    try:
        upload = form.get("file")
        if upload is None:
            raise PredictError("The form has no field 'file'.",
                               hint="Send the image as multipart/form-data in the field "
                               "'file', e.g. curl -F file=@cat.jpg ...")
        if isinstance(upload, str):
            raise PredictError("The form field 'file' is text, not an uploaded file.",
                               hint="Upload the image file itself, e.g. curl -F "
                               "file=@cat.jpg ...")
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise PredictError("The uploaded file is empty.",
                           hint="Send the image's bytes in the field 'file'.")
    name = spec.image_input(served.signature)
    array = await run_in_threadpool(image_tensor, data, spec.image, served.inputs[name])
    return {name: (array, datatype(array.dtype))}


def image_tensor(data: bytes, image: ImageSpec, spec: TensorSpec) -> np.ndarray:
    """An encoded image as the model's input: decoded, oriented, converted, resized,
    cropped, scaled and normalized as `image` says; a batch of one when `spec` has one."""
    from optiserve.core.deps import require

    require("PIL", extra="images", feature="Image prediction")
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
    except Exception as exc:  # Pillow raises many types for bytes that are not an image
        why = "" if isinstance(exc, UnidentifiedImageError) else f" ({first_line(exc, 120)})"
        raise PredictError(f"The uploaded file ({len(data)} bytes) is not an image Pillow "
                           f"can read{why}.",
                           hint="Send a PNG, JPEG, WebP, GIF, BMP or TIFF image.") from None
    _size_ok(width, height, "The image")
    try:
        im = ImageOps.exif_transpose(im) or im
        im = im.convert(image.color)
    except Exception as exc:  # truncated or damaged data, a mode Pillow cannot convert
        raise PredictError(f"The image could not be decoded as {image.color} "
                           f"({first_line(exc, 120)}); it may be truncated or damaged.",
                           hint="Send the complete file, or re-save it as PNG or JPEG.") \
            from None
    rank = len(spec.shape)
    dims = spec.shape[-3:]
    fixed_hw = (dims[1], dims[2]) if image.layout == "NCHW" else (dims[0], dims[1])
    target = _resized(im.size, image, fixed_hw)
    if target is not None and target != im.size:
        _size_ok(*target, "The resized image")
        im = im.resize(target, Image.BILINEAR)
    if image.crop is not None:
        ch, cw = image.crop
        w, h = im.size
        if ch > h or cw > w:
            raise PredictError(f"The image is {w}x{h} (width x height) after resizing, "
                               f"smaller than the crop {cw}x{ch}.",
                               hint="Send a larger image.")
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        im = im.crop((left, top, left + cw, top + ch))
    if image.dtype == "uint8":
        x = np.asarray(im, dtype=np.uint8)
    else:
        x = np.asarray(im, dtype=np.float32) * np.float32(image.scale)
        if image.mean is not None:
            x = x - np.asarray(image.mean, dtype=np.float32)
        if image.std is not None:
            x = x / np.asarray(image.std, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if image.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    if rank == 4:
        x = x[None]
    return np.ascontiguousarray(x, dtype=np.dtype(image.dtype))


def _resized(size: tuple[int, int], image: ImageSpec, fixed_hw: tuple[int, int]
             ) -> tuple[int, int] | None:
    """(width, height) to resize to, torchvision's way, or None to keep the size."""
    w, h = size
    if isinstance(image.resize, int):
        short, long_ = (w, h) if w <= h else (h, w)
        new_long = max(1, int(image.resize * long_ / short))
        return (image.resize, new_long) if w <= h else (new_long, image.resize)
    if image.resize is not None:
        return (image.resize[1], image.resize[0])
    if image.crop is None and fixed_hw[0] > 0 and fixed_hw[1] > 0:
        return (fixed_hw[1], fixed_hw[0])
    return None


def _size_ok(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise PredictError(f"{what} is {width}x{height} pixels, which has no content.")
    if width * height > MAX_PIXELS:
        raise PredictError(f"{what} is {width}x{height} = {width * height / 1e6:.0f} "
                           f"megapixels; at most {MAX_PIXELS / 1e6:.0f} are taken.",
                           hint="Downscale it before sending; the model sees it resized "
                           "anyway.")
