"""Signature of a model: input and output tensors with names, dtypes and shapes (-1 = dynamic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TensorSpec(BaseModel):
    """One named tensor. `dtype` is a numpy dtype name (float32, int64, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Tensor name as the runtime knows it.")
    dtype: str = Field(description="numpy dtype name, e.g. 'float32', 'int64', 'str'.")
    shape: tuple[int, ...] = Field(description="Dimensions; -1 marks a dynamic one (the batch).")

    def describe(self) -> str:
        """name:dtype[shape], e.g. input:float32[-1, 9]."""
        return f"{self.name}:{self.dtype}{list(self.shape)}"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether rows of `shape` (any number of them) fit this tensor."""
        return len(shape) == len(self.shape) and all(
            d in (-1, g) for d, g in zip(self.shape[1:], shape[1:]))


class Signature(BaseModel):
    """Inputs and outputs of a model, in call order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: tuple[TensorSpec, ...] = Field(description="Inputs in the order the model takes them.")
    outputs: tuple[TensorSpec, ...] = Field(description="Outputs in the order the model gives them.")

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def describe(self) -> str:
        def fmt(ts: tuple[TensorSpec, ...]) -> str:
            return ", ".join(t.describe() for t in ts)

        return f"inputs [{fmt(self.inputs)}] -> outputs [{fmt(self.outputs)}]"
