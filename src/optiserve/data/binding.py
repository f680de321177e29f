"""Bind columns to a model's inputs: the validation data must fit the signature, or say why not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optiserve.core.errors import DatasetError, SignatureMismatchError
from optiserve.core.types import Signature, TensorSpec


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
                f"Label column '{label_column}' is not in the "
            + (f"data ({description})." if description else "validation data."),
                hint=f"Columns found: {', '.join(sorted(columns))}.")
        labels = columns.pop(label_column)
    names = [s.name for s in signature.inputs]
    if all(n in columns for n in names):
        inputs = {s.name: _fit(columns[s.name], s)
                  for s in signature.inputs}
    elif len(signature.inputs) == 1 and not _unnamed_arrays(columns):
        inputs = {names[0]: _stack(columns, signature, feature_names, description)}
    else:
        raise _unmatched(columns, signature, label_column, description)
    lengths = {len(v) for v in inputs.values()} | ({len(labels)} if labels is not None else set())
    if 0 in lengths:
        raise DatasetError("The validation data has no rows.",
                           hint="Give at least one row (more rows make the gate meaningful).")
    if len(lengths) != 1:
        raise SignatureMismatchError(f"Inputs and labels have different row counts {lengths}.")
    return Dataset(inputs=inputs, labels=labels, description=description)


def _shape(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def _unnamed_arrays(columns: dict[str, np.ndarray]) -> bool:
    """Several arrays, some of them already shaped (not one value per row): which one is
    which input cannot be guessed (a lone shaped array is taken as the one input)."""
    return len(columns) > 1 and any(v.ndim != 1 for v in columns.values())


def _unmatched(columns: dict[str, np.ndarray], signature: Signature, label_column: str | None,
               description: str) -> SignatureMismatchError:
    """The data's arrays do not name the model's inputs: say what was found, what was
    expected, and how to fix it."""
    names = [s.name for s in signature.inputs]
    expected = ", ".join(s.describe() for s in signature.inputs)
    found = ", ".join(f"{k}:{_shape(v)}" for k, v in columns.items()) or "none"
    if label_column:
        found += f" (labels: '{label_column}')"
    missing = [n for n in names if n not in columns]
    where = f" ({description})" if description else ""
    # arrays with one value per row, beside the shaped ones: probably the labels
    maybe_labels = [k for k, v in columns.items() if v.ndim == 1] \
        if not label_column and any(len(s.shape) != 1 for s in signature.inputs) else []
    fix = ("Name each array after the model input it feeds, e.g. np.savez(path, "
           + ", ".join(f"{n}=..." for n in names) + ")")
    if maybe_labels:
        fix += (f"; or, if '{maybe_labels[0]}' holds the labels, name it with --label-column "
                f"{maybe_labels[0]} (label_column='{maybe_labels[0]}' in Python)")
    return SignatureMismatchError(
        f"The data{where} does not match the model's inputs: it has arrays [{found}]; the "
        f"model expects [{expected}]: the data lacks {missing}.",
        hint=fix + ".")


def _stack(columns, signature, feature_names, description: str = "") -> np.ndarray:
    spec = signature.inputs[0]
    arrays = list(columns.values())
    if len(arrays) == 1 and arrays[0].ndim >= 2:  # one array, already shaped (NPZ)
        return _fit(arrays[0], spec)
    if not arrays:
        raise SignatureMismatchError(
            f"The data{f' ({description})' if description else ''} has no columns for the "
            f"model's input {spec.describe()}.",
            hint="Give the feature columns (or an array named after the input).")
    order = feature_columns(list(columns), spec, feature_names,
                            "the validation data (besides the label)",
                            fix="Select exactly the model's feature columns (and name the "
                            "label column).")
    bad = [c for c in order if columns[c].dtype.kind not in "biuf"]
    if bad:
        raise SignatureMismatchError(f"Columns {bad} are not numeric.",
                                     hint="Encode them as numbers, as the model was trained.")
    if len({len(columns[c]) for c in order}) > 1:
        raise SignatureMismatchError(
            "The columns have different lengths: "
            + ", ".join(f"{c}:{_shape(columns[c])}" for c in order) + ".",
            hint="Give every column one value per row.")
    return _fit(np.column_stack([columns[c] for c in order]), spec)


def feature_columns(columns: list[str], spec: TensorSpec, feature_names: list | None,
                    data: str, *, strict: bool = False, fix: str = "") -> list[str]:
    """The columns that feed a model's one 2-D input, in order: the feature names it recorded
    when trained (each must be among `columns`; with `strict`, nothing else may be), else
    `columns` as given, exactly as many as the input is wide. Validation data and /predict
    records are both read this way; `data` names them in errors ("the records")."""
    if feature_names:
        order = [str(c) for c in feature_names]
        missing = [c for c in order if c not in columns]
        unknown = [c for c in columns if c not in order] if strict else []
        if missing or unknown:
            raise SignatureMismatchError(
                f"The features the model was trained on do not match {data}: "
                + "; ".join(part for part in (
                    f"missing {quoted(missing)}" if missing else "",
                    f"unknown {quoted(unknown)}" if unknown else "") if part) + ".",
                hint=f"Its features, in order: {', '.join(order)}.")
        return order
    width = spec.shape[1] if len(spec.shape) == 2 else -1
    if width not in (-1, len(columns)):
        raise SignatureMismatchError(
            f"The model's input '{spec.name}' takes {width} features; {data} hold "
            f"{len(columns)} columns ({', '.join(columns)}).",
            hint=fix or f"Give exactly {width} columns, in the model's feature order.")
    return list(columns)


def quoted(names: list[str]) -> str:
    """'a', 'b', 'c' (at most 20 named, then how many more)."""
    shown = ", ".join(f"'{n}'" for n in names[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _fit(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The rows of one input, checked against its spec and cast to its dtype."""
    name, dtype = spec.name, spec.dtype
    wrong = spec.mismatch(array.shape) if spec.shape else None
    if wrong:
        raise SignatureMismatchError(f"Input '{name}' {wrong}.",
                                     hint="Reshape the data to the model's input shape.")
    if dtype in ("str", "object"):
        return array
    try:
        return np.ascontiguousarray(array, dtype=np.dtype(dtype))
    except (TypeError, ValueError):
        raise SignatureMismatchError(
            f"Input '{name}' is {dtype}; the data ({array.dtype}) cannot be cast to it.") from None
