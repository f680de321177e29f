"""Signature of a model: input and output tensors with names, dtypes and shapes (-1 = dynamic)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: the size example inputs give a dynamic dimension other than the batch (a sequence length)
EXAMPLE_SEQ = 8


class TensorSpec(BaseModel):
    """One named tensor. `dtype` is a numpy dtype name (float32, int64, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Tensor name as the runtime knows it.")
    dtype: str = Field(description="numpy dtype name, e.g. 'float32', 'int64', 'str'.")
    shape: tuple[int, ...] = Field(description="Dimensions; -1 marks a dynamic one (the batch).")

    def describe(self) -> str:
        """name:dtype[shape], e.g. input:float32[-1, 9]."""
        return f"{self.name}:{self.dtype}{list(self.shape)}"

    def fits(self, shape: tuple[int, ...], *, rows: bool = True) -> bool:
        """Whether an array of `shape` fits this tensor: the same rank and every fixed
        dimension equal; with `rows`, any number of rows (the first dimension is free)."""
        mine = self.shape
        if len(shape) != len(mine):
            return False
        for i in range(1 if rows else 0, len(mine)):  # a loop: it runs on every request
            if mine[i] != -1 and mine[i] != shape[i]:
                return False
        return True

    def mismatch(self, shape: tuple[int, ...], *, rows: bool = True) -> str | None:
        """Why an array of `shape` does not fit (None if it does): the one wording every check
        of data, training rows and requests against a model's input uses."""
        if self.fits(shape, rows=rows):
            return None
        return (f"has shape {list(shape)}; the model expects {list(self.shape)} "
                "(-1: any size)")


class Signature(BaseModel):
    """Inputs and outputs of a model, in call order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: tuple[TensorSpec, ...] = Field(description="Inputs in the order the model takes them.")
    outputs: tuple[TensorSpec, ...] = Field(description="Outputs in the order the model gives them.")

    def example_inputs(self, rows: int = 2) -> dict[str, np.ndarray]:
        """Inputs of this signature with `rows` rows (see `example_inputs`)."""
        return example_inputs(self.inputs, rows)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def describe(self) -> str:
        def fmt(ts: tuple[TensorSpec, ...]) -> str:
            return ", ".join(t.describe() for t in ts)

        return f"inputs [{fmt(self.inputs)}] -> outputs [{fmt(self.outputs)}]"


def example_inputs(specs: Iterable[TensorSpec], rows: int = 2) -> dict[str, np.ndarray]:
    """Inputs built from tensor specs, to trace, warm up or try a model without data: `rows`
    for a dynamic first dimension, EXAMPLE_SEQ for the other dynamic ones; ones for integers
    and booleans (valid ids and masks), seeded normal floats, empty strings for text."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in specs:
        shape = tuple(rows if i == 0 and d == -1 else (EXAMPLE_SEQ if d == -1 else d)
                      for i, d in enumerate(spec.shape))
        if spec.dtype in ("str", "object"):
            out[spec.name] = np.full(shape, "", dtype=object)
            continue
        dt = np.dtype(spec.dtype)
        out[spec.name] = (np.ones(shape, dt) if dt.kind in "iub"
                          else rng.standard_normal(shape).astype(dt))
    return out
