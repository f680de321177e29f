"""Training rows from Python batches: a torch DataLoader, or any iterable of batches.

The Python API takes training data the way PyTorch users hold it. Each batch is one of:
- a dict keyed by the model's input names, plus optionally `label` / `labels` / `y` / `target`;
- a tuple or list: the inputs in the signature's order, then optionally the labels;
- a single array or tensor, for a model with one input.
Tensors are copied to numpy on the CPU. The rows are bound to the signature like file data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from optiserve.core.errors import DatasetError
from optiserve.core.types import Signature
from optiserve.data.binding import Dataset

LABEL_KEYS = ("label", "labels", "y", "target")
#: rows read at most (training passes sample from them; a DataLoader may be endless)
MAX_ROWS = 200_000


def from_batches(batches: Iterable[Any], signature: Signature, *,
                 description: str | None = None) -> Dataset:
    names = [s.name for s in signature.inputs]
    inputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    rows = 0
    for i, batch in enumerate(batches):
        parts, label = _split(batch, names, i)
        sizes = {len(a) for a in parts.values()} | ({len(label)} if label is not None else set())
        if len(sizes) != 1:
            raise DatasetError(f"Batch {i} of the training data has inputs and labels of "
                               f"different lengths {sorted(sizes)}.",
                               hint="Every item of a batch needs the same first dimension.")
        if (label is None) != (not labels) and i > 0:
            raise DatasetError(f"Batch {i} of the training data "
                               f"{'lacks' if label is None else 'adds'} labels the other "
                               "batches have" + (" not" if label is not None else "") + ".",
                               hint="Give labels in every batch or in none.")
        for n in names:
            inputs[n].append(parts[n])
        if label is not None:
            labels.append(label)
        rows += sizes.pop()
        if rows >= MAX_ROWS:
            break
    if rows == 0:
        raise DatasetError("The training data yielded no rows.",
                           hint="Pass a DataLoader (or iterable of batches) with data in it.")
    arrays = {n: np.concatenate(v) for n, v in inputs.items()}
    for spec in signature.inputs:
        got = arrays[spec.name]
        wrong = spec.mismatch(got.shape)
        if wrong:
            raise DatasetError(f"Training input '{spec.name}' {wrong}.")
    return Dataset(arrays, np.concatenate(labels) if labels else None,
                   description or f"{rows} rows from {type(batches).__name__}")


def _split(batch: Any, names: list[str], i: int) -> tuple[dict[str, np.ndarray],
                                                          np.ndarray | None]:
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise DatasetError(f"Batch {i} of the training data has no '{missing[0]}' (it has "
                               f"{', '.join(map(str, batch))}).",
                               hint=f"Key batches by the model's inputs: {', '.join(names)}.")
        label = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {n: _array(batch[n]) for n in names}, None if label is None else _array(label)
    items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if len(items) not in (len(names), len(names) + 1):
        raise DatasetError(f"Batch {i} of the training data has {len(items)} items; the "
                           f"model takes {len(names)} input(s) ({', '.join(names)}) and "
                           "optionally labels after them.",
                           hint="Yield (inputs..., labels) tuples or dicts keyed by input name.")
    label = _array(items[len(names)]) if len(items) > len(names) else None
    return {n: _array(x) for n, x in zip(names, items)}, label


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise DatasetError("A training batch holds a scalar where rows were expected.",
                           hint="Batches hold arrays whose first dimension is the row.")
    return arr
