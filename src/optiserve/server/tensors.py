"""Open Inference Protocol tensors: V2 datatypes <-> numpy, JSON data and the binary tensor
extension, checked against the served model's signature.

Shared by the REST face (http/v2.py) and the gRPC face (grpc/): both decode to
`dict[name, np.ndarray]`, and every mistake is a `TensorError` (400 / INVALID_ARGUMENT) that
names the tensor, what was wrong and what the model takes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np

from optiserve.core.errors import OptiserveError
from optiserve.core.types import TensorSpec

# V2 datatype -> numpy dtype (little-endian, as the binary extension sends them)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_KIND = {(d.kind, d.itemsize): name for name, d in DTYPES.items() if name != "BYTES"}
MAX_ELEMENTS = 1 << 28  # a shape may not claim more than this (256 M elements)
MAX_DIMS = 32  # numpy 1.x's limit; no model takes more (numpy 2 refuses past 64 with a 500)
MAX_DEPTH = 64  # nesting of JSON `data` lists (a tensor of MAX_DIMS dims needs MAX_DIMS)


class TensorError(OptiserveError):
    """An input or output that does not fit the protocol or the model."""


@functools.lru_cache(maxsize=256)  # asked twice per request, of a handful of dtypes
def datatype(dtype: str | np.dtype) -> str:
    """The V2 datatype of a numpy dtype (or dtype name); strings and objects are BYTES."""
    d = np.dtype(dtype) if not (isinstance(dtype, str) and dtype in ("str", "object")) \
        else np.dtype(object)
    if d.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((d.kind, d.itemsize))
    if name is None:
        raise TensorError(f"numpy dtype {d} has no Open Inference Protocol datatype.")
    return name


def platform(format: str) -> str:
    """The platform string Triton clients expect for an artifact format."""
    return {"onnx": "onnxruntime_onnx", "openvino": "openvino", "torchscript":
            "pytorch_libtorch", "skops": "sklearn", "pkl": "sklearn"}.get(format, format)


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    """A tensor's shape as sent (REST JSON, REST binary, gRPC): a list of at most MAX_DIMS
    non-negative integers claiming at most MAX_ELEMENTS elements."""
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorError(f"Input '{name}' has shape {_shown(shape)}; a shape is a list of "
                          "non-negative integers, e.g. [1, 4].")
    if len(shape) > MAX_DIMS:
        raise TensorError(f"Input '{name}' has {len(shape)} dimensions; at most {MAX_DIMS} "
                          "are accepted.")
    if math.prod(shape) > MAX_ELEMENTS:
        raise TensorError(f"Input '{name}' claims {math.prod(shape)} elements; at most "
                          f"{MAX_ELEMENTS} are accepted in one tensor.")
    return tuple(shape)


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _dtype(name: str, dt: object) -> np.dtype:
    if not isinstance(dt, str) or dt not in DTYPES:
        raise TensorError(f"Input '{name}' has datatype {_shown(dt)}.",
                          hint=f"Use one of: {', '.join(DTYPES)}.")
    return DTYPES[dt]


def from_json(name: str, shape: object, dt: object, data: object) -> np.ndarray:
    """An input given as JSON `data` (flat or nested, row-major)."""
    shape, dtype = check_shape(name, shape), _dtype(name, dt)
    if not isinstance(data, list):
        data = [data]
    try:
        if dtype.kind == "O":
            flat = list(_flatten(data))
            array = np.empty(len(flat), dtype=object)
            odd = [x for x in flat if not isinstance(x, str)]
            if odd:
                raise TypeError(f"BYTES elements are strings, got {type(odd[0]).__name__}")
            array[:] = [x.encode() for x in flat]
        else:
            array = np.asarray(data, dtype=dtype)
            if dtype.kind in "iub" and not _exact(data, array):
                raise ValueError("values that are not of this type")
    except (ValueError, TypeError, OverflowError) as exc:
        raise TensorError(f"Input '{name}': its data does not fit datatype {dt} ({exc}).",
                          hint="Send numbers of that type, row-major, flat or nested.") from None
    if array.size != math.prod(shape):
        raise TensorError(f"Input '{name}' has {array.size} values but shape {list(shape)} "
                          f"needs {math.prod(shape)}.")
    return array.reshape(shape)


def _exact(data: list, array: np.ndarray) -> bool:
    """Integers and booleans must not arrive as fractions or text (numpy would truncate), in
    any element, not only the first; booleans are true/false or 0/1."""
    if not array.size:
        return True
    probe = np.asarray(data)  # float64 for [0, 2**64 - 1]: then look at each element
    if probe.dtype.kind not in "biu" and not all(isinstance(x, int) for x in _flatten(data)):
        return False
    return array.dtype.kind != "b" or probe.dtype.kind == "b" or \
        bool(((probe == 0) | (probe == 1)).all())


def _flatten(data: list) -> Iterable:
    """The leaves of nested lists, row-major; without recursion, and refusing nesting deeper
    than MAX_DEPTH (a hostile body nests thousands deep)."""
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                if len(stack) >= MAX_DEPTH:
                    raise ValueError(f"lists nested more than {MAX_DEPTH} deep")
                stack.append(iter(x))
                break
            yield x
        else:
            stack.pop()


def from_binary(name: str, shape: object, dt: object, raw: memoryview) -> np.ndarray:
    """An input given as raw little-endian bytes (binary extension, gRPC raw contents)."""
    shape, dtype = check_shape(name, shape), _dtype(name, dt)
    count = math.prod(shape)
    if dtype.kind == "O":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise TensorError(f"Input '{name}': BYTES data ends inside a length prefix.")
            n = int.from_bytes(raw[pos:pos + 4], "little")
            if pos + 4 + n > len(raw):
                raise TensorError(f"Input '{name}': a BYTES element of {n} bytes runs past "
                                  "the end of its data.")
            items.append(bytes(raw[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if len(items) != count:
            raise TensorError(f"Input '{name}' has {len(items)} BYTES elements but shape "
                              f"{list(shape)} needs {count}.")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise TensorError(f"Input '{name}' has {len(raw)} bytes of data but shape "
                          f"{list(shape)} of {dt} needs {count * dtype.itemsize}.")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an output (BYTES: 4-byte length + bytes per element)."""
    if array.dtype.kind in "OSU":
        out = bytearray()
        for x in array.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            out += len(b).to_bytes(4, "little") + b
        return bytes(out)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def json_data(array: np.ndarray) -> object:
    """A flat, JSON-ready form of an output (orjson serializes numpy arrays natively)."""
    if array.dtype.kind in "OSU":
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x)
                for x in array.reshape(-1)]
    if array.dtype == np.float16:
        return array.reshape(-1).astype(np.float32)
    return np.ascontiguousarray(array).reshape(-1)


def check_input(spec: TensorSpec, array: np.ndarray, given: str, *, allow_nan: bool) -> None:
    """The model takes this tensor: datatype, rank, fixed dimensions, finite floats."""
    want = datatype(spec.dtype)
    if given != want:
        raise TensorError(f"Input '{spec.name}' has datatype {given}; the model takes {want}.")
    if not spec.fits(array.shape, rows=False):  # a fixed batch size is checked too
        raise TensorError(f"Input '{spec.name}' {spec.mismatch(array.shape, rows=False)}.")
    if not allow_nan and array.dtype.kind == "f" and array.size and \
            not np.isfinite(array).all():
        raise TensorError(f"Input '{spec.name}' contains NaN or infinity, which this model "
                          "is not served to take.",
                          hint="Send finite values, or deploy with allow_nan: true if the "
                          "model handles missing values.")
