"""Bind columns to a model's inputs: the validation data must fit the signature, or say why not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optiserve.core.errors import DatasetError, SignatureMismatchError
from optiserve.core.types import Signature


@dataclass
class Dataset:
    """Inputs keyed by model input name, optional labels, and where they came from."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int):
        for start in range(0, self.n, size):
            yield {k: v[start:start + size] for k, v in self.inputs.items()}

    def take(self, batch: int) -> dict[str, np.ndarray]:
        """`batch` rows, repeating the data when it has fewer."""
        idx = np.arange(batch) % self.n
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}


def bind(columns: dict[str, np.ndarray], signature: Signature, *, label_column: str | None,
         feature_names: list[str] | None = None, description: str = "") -> Dataset:
    columns = dict(columns)
    labels = None
    if label_column:
        if label_column not in columns:
            raise DatasetError(
                f"Label column '{label_column}' is not in the validation data.",
                hint=f"Columns found: {', '.join(sorted(columns))}.")
        labels = columns.pop(label_column)
    names = [s.name for s in signature.inputs]
    if all(n in columns for n in names):
        inputs = {s.name: _fit(columns[s.name], s.dtype, s.shape, s.name)
                  for s in signature.inputs}
    elif len(signature.inputs) == 1:
        inputs = {names[0]: _stack(columns, signature, feature_names)}
    else:
        missing = [n for n in names if n not in columns]
        raise SignatureMismatchError(
            f"The model takes inputs {names}; the validation data lacks {missing}.",
            hint=f"Columns/arrays found: {', '.join(sorted(columns))}.")
    lengths = {len(v) for v in inputs.values()} | ({len(labels)} if labels is not None else set())
    if 0 in lengths:
        raise DatasetError("The validation data has no rows.",
                           hint="Give at least one row (more rows make the gate meaningful).")
    if len(lengths) != 1:
        raise SignatureMismatchError(f"Inputs and labels have different row counts {lengths}.")
    return Dataset(inputs=inputs, labels=labels, description=description)


def _stack(columns, signature, feature_names) -> np.ndarray:
    spec = signature.inputs[0]
    arrays = list(columns.values())
    if len(arrays) == 1 and arrays[0].ndim >= 2:  # one array, already shaped (NPZ)
        return _fit(arrays[0], spec.dtype, spec.shape, spec.name)
    width = spec.shape[1] if len(spec.shape) == 2 else -1
    order = feature_names or list(columns)
    if feature_names:
        missing = [c for c in feature_names if c not in columns]
        if missing:
            raise SignatureMismatchError(
                f"The model was trained on features the validation data lacks: {missing}.",
                hint="Select those columns in the query or file.")
    if width not in (-1, len(order)):
        raise SignatureMismatchError(
            f"The model's input '{spec.name}' has {width} features; the validation data has "
            f"{len(order)} columns besides the label ({', '.join(order)}).",
            hint="Select exactly the model's feature columns (and name the label column).")
    bad = [c for c in order if columns[c].dtype.kind not in "biuf"]
    if bad:
        raise SignatureMismatchError(f"Columns {bad} are not numeric.",
                                     hint="Encode them as numbers, as the model was trained.")
    return _fit(np.column_stack([columns[c] for c in order]), spec.dtype, spec.shape, spec.name)


def _fit(array: np.ndarray, dtype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    if shape and array.ndim != len(shape):
        raise SignatureMismatchError(
            f"Input '{name}' expects {len(shape)} dimensions {list(shape)}; the data has "
            f"shape {list(array.shape)}.", hint="Reshape the data to the model's input shape.")
    for got, want in zip(array.shape[1:], shape[1:]):
        if want != -1 and got != want:
            raise SignatureMismatchError(
                f"Input '{name}' expects shape {list(shape)}; the data has {list(array.shape)}.",
                hint="Reshape the data to the model's input shape.")
    if dtype in ("str", "object"):
        return array
    try:
        return np.ascontiguousarray(array, dtype=np.dtype(dtype))
    except (TypeError, ValueError):
        raise SignatureMismatchError(
            f"Input '{name}' is {dtype}; the data ({array.dtype}) cannot be cast to it.") from None
