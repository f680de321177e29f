"""Pass interface and registry.

A pass is a small class with a `name`, the extras it needs, a nested pydantic `Config`
(extra="forbid", a description on every field) and one `run()`. A config field that trades
speed for accuracy declares the values worth trying with `search=[...]` in its json_schema_extra
and defaults to None; the search layer (optimize/search.py) expands those into candidates.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from optiserve.core.errors import ConfigError, UnknownNameError
from optiserve.core.hardware import Hardware, detect
from optiserve.core.settings import Settings
from optiserve.core.types import Signature

PASSES: dict[str, str] = {
    "onnx_conversion": "optiserve.passes.onnx_conversion:OnnxConversion",
    "graph_optimization": "optiserve.passes.graph_optimization:GraphOptimization",
    "quantization": "optiserve.passes.quantization:Quantization",
    "openvino": "optiserve.passes.openvino:OpenVINO",
    "qat": "optiserve.passes.qat:QAT",
    "fp16": "optiserve.passes.fp16:FP16",
    "tensorrt": "optiserve.passes.tensorrt:TensorRT",
    # training-time passes on the PyTorch original (passes/training.py); each writes a .pt2
    "pruning": "optiserve.passes.pruning:MagnitudePruning",
    "lottery_ticket": "optiserve.passes.pruning:LotteryTicket",
    "structured_pruning": "optiserve.passes.structured_pruning:StructuredPruning",
    "distillation": "optiserve.passes.distillation:Distillation",
    "low_rank": "optiserve.passes.low_rank:LowRank",
}


@dataclass
class Artifact:
    """A model between passes: its file, format, signature, facts, and the chain that made it."""

    path: Path
    format: str
    signature: Signature
    meta: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def then(self, path: Path, name: str, config: BaseModel, *, format: str = "onnx",
             signature: Signature | None = None, notes: list[str] | None = None,
             meta: dict[str, Any] | None = None) -> Artifact:
        return Artifact(path=path, format=format, signature=signature or self.signature,
                        meta={**self.meta, **(meta or {})},
                        passes=[*self.passes, {
                            "name": name, "config": config.model_dump(mode="json"),
                            "set": config.model_dump(mode="json", exclude_defaults=True)}],
                        notes=[*self.notes, *(notes or [])])

    @property
    def label(self) -> str:
        parts = []
        for p in self.passes:
            shown = p.get("set", {})
            parts.append(p["name"] + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})"
                                      if shown else ""))
        return " > ".join(parts) or "original"


@dataclass
class PassContext:
    """What a pass may use: a scratch folder, settings, a small batch of real inputs, rows to
    calibrate with (a Dataset: the calibration data, else the validation data), rows to train
    with (a Dataset, or None when the request gave no training data), and the hardware."""

    workdir: Path
    settings: Settings
    sample: dict[str, np.ndarray]
    calibration: Any = None
    training: Any = None
    hardware: Hardware = field(default_factory=detect)
    #: time.monotonic() when the run must stop (OPTIMIZATION_MAX_TIME_MINUTES); passes that
    #: train stop there and say so. None: no run limit (a pass called on its own).
    deadline: float | None = None
    #: the batch sizes the run benchmarks (a pass that fixes shapes must cover them)
    batch_sizes: tuple[int, ...] = ()
    #: progress(message, 0) shows what a long pass is doing (a training loss) on the run's
    #: progress bar; None when nobody watches
    progress: Callable[[str, float], None] | None = None


class PassSkipped(Exception):
    """The pass has nothing to do on this model (e.g. no quantizable operator); not an error."""


class Pass:
    name: ClassVar[str]
    extras: ClassVar[tuple[str, ...]] = ()
    needs_onnx: ClassVar[bool] = True
    #: A branching pass makes leaf candidates (another runtime's format) from every node of the
    #: tree it accepts, instead of replacing the frontier the next pass works on.
    branches: ClassVar[bool] = False
    #: An alternative-making pass (pruning, distillation, low-rank: a smaller network, not a
    #: new format of the same one) leaves its input on the frontier beside its children, so
    #: the passes after it run on both and the unshrunk model competes in the same form.
    alternative: ClassVar[bool] = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def run(self, artifact: Artifact, config: BaseModel, ctx: PassContext) -> Artifact:
        raise NotImplementedError

    @classmethod
    def parse_config(cls, values: dict[str, Any] | None) -> BaseModel:
        return parse_options(cls.Config, values, f"pass '{cls.name}'", cls.name)


def parse_options(config: type[BaseModel], values: dict[str, Any] | None, owner: str,
                  name: str) -> BaseModel:
    """`values` validated by `config`; the first problem as one ConfigError naming the option,
    what was given and the options there are."""
    try:
        return config(**(values or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "option"
        fields = ", ".join(config.model_fields) or "none"
        raise ConfigError(f"Option '{where}' of {owner} is invalid: {err.get('msg')} "
                          f"(got {err.get('input')!r}).",
                          hint=f"Options of '{name}': {fields}.") from None


def get_pass(name: str) -> type[Pass]:
    if name not in PASSES:
        raise UnknownNameError("optimization", name, PASSES)
    module, _, cls = PASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
