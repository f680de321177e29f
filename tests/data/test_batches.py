"""Training rows from Python batches (a torch DataLoader or any iterable), bound to the
signature like file data; a batch that does not fit says which and why."""

from __future__ import annotations

import numpy as np
import pytest

import optiserve
from optiserve.core.errors import DatasetError
from optiserve.core.types import Signature, TensorSpec
from optiserve.data.batches import from_batches

SIG = Signature(inputs=(TensorSpec(name="x", dtype="float32", shape=(-1, 4)),),
                outputs=(TensorSpec(name="y", dtype="float32", shape=(-1, 3)),))
TWO = Signature(inputs=(TensorSpec(name="ids", dtype="int64", shape=(-1, 5)),
                        TensorSpec(name="mask", dtype="int64", shape=(-1, 5))),
                outputs=SIG.outputs)


def _rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_tuples_with_labels_and_plain_arrays():
    ds = from_batches([(_rows(3), np.array([0, 1, 2])), (_rows(2, 1), np.array([1, 1]))], SIG)
    assert ds.n == 5 and ds.inputs["x"].shape == (5, 4)
    assert ds.labels.tolist() == [0, 1, 2, 1, 1]
    assert from_batches([_rows(4)], SIG).labels is None


def test_dicts_keyed_by_input_name_with_a_label_key():
    ids = np.ones((2, 5), np.int64)
    ds = from_batches([{"ids": ids, "mask": ids, "target": np.array([3, 4])}] * 3, TWO)
    assert ds.n == 6 and set(ds.inputs) == {"ids", "mask"} and ds.labels.tolist() == [3, 4] * 3


def test_a_torch_dataloader():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.from_numpy(_rows(10)), torch.arange(10))
    ds = from_batches(torch.utils.data.DataLoader(data, batch_size=4), SIG)
    assert ds.n == 10 and ds.labels.tolist() == list(range(10))
    assert ds.description == "10 rows from DataLoader"


@pytest.mark.parametrize("batches, says", [
    ([], "yielded no rows"),
    ([(_rows(2), _rows(2), np.zeros(2))], "has 3 items; the model takes 1 input(s) (x)"),
    ([{"x": _rows(2)}], None),
    ([{"input": _rows(2)}], "has no 'x' (it has input)"),
    ([(_rows(3), np.zeros(2))], "different lengths [2, 3]"),
    ([(_rows(2), np.zeros(2)), _rows(2)], "lacks labels the other batches have"),
    ([np.zeros((2, 5), np.float32)], "has shape [2, 5]; the model expects [-1, 4]"),
])
def test_batches_that_do_not_fit_are_named(batches, says):
    if says is None:
        assert from_batches(batches, SIG).n == 2
        return
    with pytest.raises(DatasetError) as err:
        from_batches(batches, SIG)
    assert says in str(err.value)


@pytest.mark.slow
@pytest.mark.integration
def test_optimize_trains_qat_from_a_dataloader(sqlite_registry, digits, digits_net, tmp_path):
    torch = pytest.importorskip("torch")
    optiserve.register("net", digits_net, example_inputs=(torch.from_numpy(digits.X_val[:2]),),
                       registry=sqlite_registry)
    np.savez(tmp_path / "val.npz", x=digits.X_val, label=digits.y_val)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(digits.X_train), torch.from_numpy(digits.y_train)), batch_size=64)
    kwargs = dict(registry=sqlite_registry, optimizations=["qat"], accuracy_threshold=0.9,
                  validation_dataset={"source": "file", "path": str(tmp_path / "val.npz"),
                                      "label_column": "label"},
                  pass_configs={"qat": {"steps": 20}}, iterations=5, warmup=1)
    result = optiserve.optimize("net", training_data=loader, **kwargs)
    qat = [c for c in result.candidates if c.artifact.passes[-1]["name"] == "qat"]
    assert qat and "1400 rows from DataLoader" in " ".join(qat[0].artifact.notes)
    with pytest.raises(DatasetError, match="has shape"):
        optiserve.optimize("net", training_data=[np.zeros((4, 3), np.float32)], **kwargs)
