"""Binding columns to a model's inputs: fit the signature or say exactly why not."""

from __future__ import annotations

import numpy as np
import pytest

from optiserve.core.errors import DatasetError, SignatureMismatchError
from optiserve.core.types import Signature, TensorSpec
from optiserve.data.binding import bind

SIG = Signature(inputs=(TensorSpec(name="input", dtype="float32", shape=(-1, 3)),),
                outputs=(TensorSpec(name="label", dtype="int64", shape=(-1,)),))


def _cols(n: int = 5, width: int = 3, label: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cols = {f"f{i}": rng.standard_normal(n) for i in range(width)}
    if label:
        cols["y"] = rng.integers(0, 2, n).astype(np.float64)
    return cols


def test_columns_are_stacked_in_order_and_cast():
    cols = _cols()
    data = bind(cols, SIG, label_column="y")
    x = data.inputs["input"]
    assert x.dtype == np.float32 and x.shape == (5, 3)
    np.testing.assert_allclose(x[:, 2], cols["f2"].astype(np.float32))
    np.testing.assert_array_equal(data.labels, cols["y"])
    assert data.n == 5


def test_feature_names_choose_and_order_columns():
    cols = {"b": np.arange(4.0), "extra": np.ones(4), "a": np.arange(4.0) * 10, "c": np.zeros(4),
            "y": np.zeros(4)}
    data = bind(cols, SIG, label_column="y", feature_names=["a", "b", "c"])
    np.testing.assert_array_equal(data.inputs["input"][1], [10, 1, 0])
    with pytest.raises(SignatureMismatchError, match="missing 'c'"):
        bind({"a": np.ones(2), "b": np.ones(2), "y": np.ones(2)}, SIG, label_column="y",
             feature_names=["a", "b", "c"])


def test_missing_label_column_lists_columns():
    with pytest.raises(DatasetError) as info:
        bind(_cols(), SIG, label_column="churned")
    msg = str(info.value)
    assert "Label column 'churned'" in msg and "Columns found: f0, f1, f2, y." in msg


def test_wrong_feature_count():
    with pytest.raises(SignatureMismatchError) as info:
        bind(_cols(width=4), SIG, label_column="y")
    msg = str(info.value)
    assert "takes 3 features" in msg and "(besides the label) hold 4 columns" in msg


def test_text_column_is_refused():
    cols = _cols()
    cols["f1"] = np.array(["a", "b", "c", "d", "e"])
    with pytest.raises(SignatureMismatchError, match=r"\['f1'\] are not numeric"):
        bind(cols, SIG, label_column="y")


def test_named_arrays_bind_directly_and_shapes_are_checked():
    sig = Signature(inputs=(TensorSpec(name="pixels", dtype="float32", shape=(-1, 1, 8, 8)),),
                    outputs=())
    ok = bind({"pixels": np.zeros((3, 1, 8, 8)), "y": np.arange(3)}, sig, label_column="y")
    assert ok.inputs["pixels"].shape == (3, 1, 8, 8)
    with pytest.raises(SignatureMismatchError, match=r"the model expects \[-1, 1, 8, 8\]"):
        bind({"pixels": np.zeros((3, 1, 7, 7))}, sig, label_column=None)
    with pytest.raises(SignatureMismatchError, match=r"has shape \[3, 64\]"):
        bind({"pixels": np.zeros((3, 64))}, sig, label_column=None)


def test_multi_input_model_needs_every_input():
    sig = Signature(inputs=(TensorSpec(name="ids", dtype="int64", shape=(-1, 4)),
                            TensorSpec(name="mask", dtype="int64", shape=(-1, 4))), outputs=())
    with pytest.raises(SignatureMismatchError, match=r"lacks \['mask'\]"):
        bind({"ids": np.ones((2, 4))}, sig, label_column=None)


def test_row_count_mismatch():
    with pytest.raises(SignatureMismatchError, match="different row counts"):
        bind({"input": np.zeros((4, 3)), "y": np.zeros(5)}, SIG, label_column="y")


def test_take_repeats_rows_and_batches_cover_all():
    data = bind(_cols(n=5), SIG, label_column="y")
    taken = data.take(12)["input"]
    assert taken.shape == (12, 3) and taken.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(taken[5], taken[0])
    assert [b["input"].shape[0] for b in data.batches(2)] == [2, 2, 1]


IMAGES = Signature(inputs=(TensorSpec(name="x", dtype="float32", shape=(-1, 1, 8, 8)),),
                   outputs=())


def test_npz_keys_that_do_not_name_the_input_say_found_expected_and_fix():
    """An NPZ of images and labels under other names: not a numpy traceback from stacking a
    4-D array with a 1-D one, but what was found, what the model takes, and how to fix it."""
    cols = {"images": np.zeros((6, 1, 8, 8), np.float32), "label": np.arange(6)}
    with pytest.raises(SignatureMismatchError) as info:
        bind(cols, IMAGES, label_column=None, description="check file: check.npz")
    msg = str(info.value)
    assert "(check file: check.npz)" in msg
    assert "images:float32[6, 1, 8, 8], label:int64[6]" in msg  # found
    assert "x:float32[-1, 1, 8, 8]" in msg and "lacks ['x']" in msg  # expected
    assert "np.savez(path, x=...)" in info.value.hint  # the fix, both ways
    assert "--label-column label" in info.value.hint and "label_column='label'" in info.value.hint
    # the fix works: with the labels named, the one array left is the input
    data = bind(cols, IMAGES, label_column="label")
    assert data.inputs["x"].shape == (6, 1, 8, 8) and data.labels.tolist() == list(range(6))


def test_two_shaped_arrays_are_not_stacked_into_channels():
    cols = {"a": np.zeros((4, 1, 8, 8)), "b": np.zeros((4, 1, 8, 8))}
    with pytest.raises(SignatureMismatchError) as info:
        bind(cols, IMAGES, label_column=None)
    msg = str(info.value)
    assert "a:float64[4, 1, 8, 8], b:float64[4, 1, 8, 8]" in msg and "lacks ['x']" in msg
    assert "--label-column" not in info.value.hint  # no 1-D array: nothing looks like labels


def test_a_scalar_array_and_columns_of_different_lengths_are_named():
    with pytest.raises(SignatureMismatchError, match=r"arrays \[f0:float64\[5\], n:int64\[\]\]"):
        bind({"f0": np.zeros(5), "n": np.array(3)}, SIG, label_column=None)
    with pytest.raises(SignatureMismatchError, match=r"different lengths: f0:float64\[5\], "
                       r"f1:float64\[4\], f2:float64\[5\]"):
        bind({"f0": np.zeros(5), "f1": np.zeros(4), "f2": np.zeros(5)}, SIG, label_column=None)


def test_multi_input_mismatch_lists_every_array_and_input():
    sig = Signature(inputs=(TensorSpec(name="ids", dtype="int64", shape=(-1, 4)),
                            TensorSpec(name="mask", dtype="int64", shape=(-1, 4))), outputs=())
    with pytest.raises(SignatureMismatchError) as info:
        bind({"input_ids": np.ones((2, 4)), "attention": np.ones((2, 4))}, sig,
             label_column=None)
    msg = str(info.value)
    assert "input_ids:float64[2, 4], attention:float64[2, 4]" in msg
    assert "ids:int64[-1, 4], mask:int64[-1, 4]" in msg and "lacks ['ids', 'mask']" in msg
    assert "np.savez(path, ids=..., mask=...)" in info.value.hint


def test_missing_label_column_names_the_data():
    with pytest.raises(DatasetError, match=r"not in the data \(check file: c.npz\)"):
        bind(_cols(), SIG, label_column="churned", description="check file: c.npz")
