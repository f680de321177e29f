"""Open Inference Protocol tensors (server/tensors.py): every V2 datatype through JSON and the
binary extension, and each way a tensor can be wrong."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from optiserve.core.types import TensorSpec
from optiserve.server.tensors import (DTYPES, MAX_ELEMENTS, TensorError, check_input, datatype,
                                      from_binary, from_json, json_data, to_bytes)

# A few values of each datatype, with its edges (min/max, negative zero, subnormal-ish).
VALUES = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 2, 127, 128, 255],
    "UINT16": [0, 1, 2, 1000, 32768, 65535],
    "UINT32": [0, 1, 2, 70000, 2**31, 2**32 - 1],
    "UINT64": [0, 1, 2, 2**40, 2**63, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 42, 127],
    "INT16": [-32768, -1, 0, 1, 300, 32767],
    "INT32": [-(2**31), -1, 0, 1, 70000, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2**40, 2**63 - 1],
    "FP16": [-2.5, -0.0, 0.0, 0.5, 1024.0, 65504.0],
    "FP32": [-1.5, 0.0, 1e-30, 3.25, 1e30, -7.0],
    "FP64": [-1.5, 0.0, 1e-300, 3.25, 1e300, 0.1],
    "BYTES": ["a", "", "héllo", "x" * 40, "\x00bin", "z"],
}
NUMERIC = [dt for dt in VALUES if dt != "BYTES"]


def _nested(flat: list, rows: int) -> list:
    step = len(flat) // rows
    return [flat[i:i + step] for i in range(0, len(flat), step)]


def test_every_datatype_is_covered():
    assert set(VALUES) == set(DTYPES)


@pytest.mark.parametrize("dt", list(VALUES))
@pytest.mark.parametrize("nested", [False, True])
def test_json_round_trip(dt, nested):
    flat = VALUES[dt]
    data = _nested(flat, 2) if nested else flat
    array = from_json("x", [2, 3], dt, data)
    assert array.shape == (2, 3)
    assert datatype(array.dtype) == dt
    if dt == "BYTES":
        assert list(array.reshape(-1)) == [s.encode() for s in flat]
    else:
        assert array.dtype == DTYPES[dt]
        np.testing.assert_array_equal(array.reshape(-1), np.array(flat, dtype=DTYPES[dt]))
    # and back out: what the server puts in a JSON response is the same values, flat
    out = orjson.loads(orjson.dumps({"data": json_data(array)},
                                    option=orjson.OPT_SERIALIZE_NUMPY))["data"]
    if dt == "FP16":
        out = [float(np.float16(v)) for v in out]
    assert out == flat


@pytest.mark.parametrize("dt", list(VALUES))
def test_binary_round_trip(dt):
    flat = VALUES[dt]
    array = from_json("x", [3, 2], dt, flat)
    raw = to_bytes(array)
    if dt != "BYTES":
        assert len(raw) == 6 * DTYPES[dt].itemsize
        assert raw == np.array(flat, dtype=DTYPES[dt]).astype(
            DTYPES[dt].newbyteorder("<")).tobytes()  # little-endian, row-major
    back = from_binary("x", [3, 2], dt, memoryview(raw))
    assert back.shape == (3, 2)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_binary_of_big_endian_array_is_little_endian():
    array = np.array([1, 256], dtype=">i4")
    assert to_bytes(array) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_bytes_binary_layout_is_length_prefixed():
    array = from_json("s", [2], "BYTES", ["ab", ""])
    assert to_bytes(array) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    # strings (what ONNX Runtime returns) encode the same way as bytes
    assert to_bytes(np.array(["ab", ""], dtype=object)) == to_bytes(array)
    assert json_data(np.array([b"ab", "c"], dtype=object)) == ["ab", "c"]


def test_scalar_and_empty_tensors():
    assert from_json("x", [], "FP32", 2.5).shape == ()
    assert from_json("x", [], "FP32", [2.5]).item() == 2.5
    assert from_json("x", [0, 4], "FP32", []).shape == (0, 4)
    assert from_binary("x", [0, 4], "FP32", memoryview(b"")).shape == (0, 4)
    assert from_binary("s", [0], "BYTES", memoryview(b"")).shape == (0,)


@pytest.mark.parametrize("dt", ["FP32", "INT64", "BYTES", "BOOL"])
def test_element_count_mismatch(dt):
    with pytest.raises(TensorError, match=r"has 6 values but shape \[2, 2\] needs 4"):
        from_json("x", [2, 2], dt, VALUES[dt])


@pytest.mark.parametrize("dt", NUMERIC)
def test_byte_length_mismatch(dt):
    raw = to_bytes(from_json("x", [6], dt, VALUES[dt]))
    with pytest.raises(TensorError, match=r"Input 'x' has \d+ bytes of data but shape \[7\]"):
        from_binary("x", [7], dt, memoryview(raw))
    with pytest.raises(TensorError, match="bytes of data"):
        from_binary("x", [6], dt, memoryview(raw[:-1]))


def test_bytes_truncated_length_prefix():
    raw = to_bytes(from_json("s", [2], "BYTES", ["ab", "cd"]))
    with pytest.raises(TensorError, match="ends inside a length prefix"):
        from_binary("s", [3], "BYTES", memoryview(raw + b"\x01\x00"))
    with pytest.raises(TensorError, match="runs past the end"):
        from_binary("s", [2], "BYTES", memoryview(raw[:-1]))
    with pytest.raises(TensorError, match="runs past the end"):
        from_binary("s", [1], "BYTES", memoryview(b"\xff\xff\xff\x7fabc"))
    with pytest.raises(TensorError, match="has 2 BYTES elements but shape \\[3\\] needs 3"):
        from_binary("s", [3], "BYTES", memoryview(raw))


@pytest.mark.parametrize("dt", ["INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL"])
@pytest.mark.parametrize("data", [[1.5, 1, 0, 1], [1, 0, 1, 2.5], [[1, 0], [1, 0.5]],
                                  [1, 0, "1", 1], ["a", 1, 0, 1]])
def test_fractions_or_text_for_an_integer_datatype_are_refused(dt, data):
    """numpy would silently truncate 2.5 to 2; every element is checked, not only the first."""
    with pytest.raises(TensorError, match=f"does not fit datatype {dt}"):
        from_json("x", [4], dt, data)


@pytest.mark.parametrize("dt, value", [("UINT8", 256), ("UINT8", -1), ("INT8", 128),
                                       ("INT16", -32769), ("UINT32", 2**32),
                                       ("INT64", 2**63), ("UINT64", -1), ("UINT64", 2**64)])
def test_out_of_range_integers_are_refused(dt, value):
    with pytest.raises(TensorError, match=f"does not fit datatype {dt}"):
        from_json("x", [2], dt, [0, value])


@pytest.mark.parametrize("data", [[0, 2], [1, -1], [True, 3]])
def test_bool_takes_only_true_false_0_1(data):
    with pytest.raises(TensorError, match="does not fit datatype BOOL"):
        from_json("b", [2], "BOOL", data)
    np.testing.assert_array_equal(from_json("b", [2], "BOOL", [1, 0]), [True, False])


@pytest.mark.parametrize("data", [["a", "b"], [{"x": 1}, 2], [[1, 2], [3]]])
def test_junk_for_a_float_datatype_is_refused(data):
    with pytest.raises(TensorError, match="does not fit datatype FP32"):
        from_json("x", [2], "FP32", data)


def test_integers_for_a_float_datatype_are_fine():
    np.testing.assert_array_equal(from_json("x", [3], "FP32", [1, 2.5, -3]), [1, 2.5, -3])


@pytest.mark.parametrize("data", [[1, 2], ["a", None], [["a"], [3]]])
def test_bytes_elements_must_be_strings(data):
    with pytest.raises(TensorError, match="does not fit datatype BYTES"):
        from_json("s", [2], "BYTES", data)


@pytest.mark.parametrize("dt", ["FLOAT32", "fp32", "STRING", None, 7, ["FP32"]])
def test_unknown_datatype(dt):
    with pytest.raises(TensorError, match="has datatype") as err:
        from_json("x", [1], dt, [1.0])
    assert "FP32" in str(err.value) and "BYTES" in str(err.value)  # the hint lists them
    with pytest.raises(TensorError, match="has datatype"):
        from_binary("x", [1], dt, memoryview(b"\x00" * 4))


@pytest.mark.parametrize("shape", [[-1, 4], [2, -3], "2,4", None, 4, [2.0, 4], [True, 4],
                                   [[2], 4], {"a": 1}])
def test_invalid_shapes(shape):
    with pytest.raises(TensorError, match="a shape is a list of non-negative integers"):
        from_json("x", shape, "FP32", [0.0] * 8)
    with pytest.raises(TensorError, match="a shape is a list of non-negative integers"):
        from_binary("x", shape, "FP32", memoryview(b"\x00" * 32))


def test_huge_shape_is_refused_before_allocating():
    shape = [1 << 20, 1 << 20]
    assert math.prod(shape) > MAX_ELEMENTS
    with pytest.raises(TensorError, match="at most"):
        from_binary("x", shape, "FP32", memoryview(b""))
    with pytest.raises(TensorError, match="at most"):
        from_json("x", shape, "FP32", [])


def test_datatype_of_numpy_dtypes():
    assert datatype("float32") == "FP32" and datatype("str") == "BYTES"
    assert datatype("object") == "BYTES" and datatype(np.dtype("<U3")) == "BYTES"
    assert datatype(np.dtype(">f8")) == "FP64"
    with pytest.raises(TensorError, match="no Open Inference Protocol datatype"):
        datatype("complex64")


# -- check_input ------------------------------------------------------------------------------
SPEC = TensorSpec(name="x", dtype="float32", shape=(-1, 4))


def test_check_input_accepts_a_fitting_tensor():
    check_input(SPEC, np.zeros((3, 4), np.float32), "FP32", allow_nan=False)
    check_input(SPEC, np.zeros((0, 4), np.float32), "FP32", allow_nan=False)


def test_check_input_datatype():
    with pytest.raises(TensorError, match="has datatype FP64; the model takes FP32"):
        check_input(SPEC, np.zeros((3, 4)), "FP64", allow_nan=False)
    strings = TensorSpec(name="s", dtype="str", shape=(-1,))
    check_input(strings, from_json("s", [1], "BYTES", ["a"]), "BYTES", allow_nan=False)
    with pytest.raises(TensorError, match="takes BYTES"):
        check_input(strings, np.zeros(1, np.float32), "FP32", allow_nan=False)


@pytest.mark.parametrize("shape", [(4,), (3, 4, 1), (3, 5), (1, 3)])
def test_check_input_rank_and_fixed_dims(shape):
    with pytest.raises(TensorError, match=r"the model expects \[-1, 4\]"):
        check_input(SPEC, np.zeros(shape, np.float32), "FP32", allow_nan=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dt", ["FP16", "FP32", "FP64"])
def test_nan_and_infinity_refused_unless_allowed(bad, dt):
    spec = TensorSpec(name="x", dtype=DTYPES[dt].name, shape=(-1, 4))
    array = np.zeros((2, 4), DTYPES[dt])
    array[1, 2] = bad
    with pytest.raises(TensorError, match="NaN or infinity") as err:
        check_input(spec, array, dt, allow_nan=False)
    assert "allow_nan" in str(err.value)
    check_input(spec, array, dt, allow_nan=True)
