"""Pass interface and registry.

A pass is a small class with a `name`, a `kind` (how the candidate tree uses it), the
`formats` it reads, a nested `Config` (a PassConfig: unknown options are refused, a
description on every field) and one `run()`. What the optimizer needs to know of a result
goes into the artifact's facts (`meta`), e.g. its `precision`. A config field that trades
speed for accuracy declares the values worth trying with `search=[...]` in its json_schema_extra
and defaults to None; the search layer (optimize/search.py) expands those into candidates.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optiserve.convert.formats import TORCH_FORMATS
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


class PassConfig(BaseModel):
    """The options of a pass. An unknown option is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DataPath:
    """Marks a pass option that names a file, e.g. `Annotated[str | None, DataPath("Student
    model file")]`. A request from the network may only name files inside the data folder:
    `confine_files` resolves every such option there, for every pass, in one place."""

    what: str  # how an error names the file


def confine_files(pass_configs: dict[str, dict[str, Any]], root: Path
                  ) -> dict[str, dict[str, Any]]:
    """The options of every pass with each file-valued option (a DataPath) resolved inside
    `root`; an unknown pass is left to the pass registry's own error."""
    from optiserve.data.sources import confine_path

    out = {}
    for name, options in pass_configs.items():
        options = dict(options or {})
        fields = get_pass(name).Config.model_fields if name in PASSES else {}
        for key, info in fields.items():
            marks = [m for m in info.metadata if isinstance(m, DataPath)]
            if marks and isinstance(options.get(key), str):
                options[key] = confine_path(options[key], root, marks[0].what)
        out[name] = options
    return out


class ExcludesNodes(PassConfig):
    """The options of a pass that can leave named nodes in FP32. When all of a family of its
    candidates fail the gate, the candidate tree retries the best one with the layers ranked
    worst against FP32 left out (optimizer/tree.py, optimizer/sensitivity.py)."""

    nodes_to_exclude: list[str] = Field(default_factory=list,
                                        description="Node names kept in FP32.")


class Pass:
    name: ClassVar[str]
    #: How the candidate tree uses the pass:
    #: - "transform": each node of the frontier is replaced by the pass's children of it;
    #: - "branch": leaf candidates (another runtime's format) are made from every node made so
    #:   far, and the frontier the next pass works on stays as it was;
    #: - "alternative": a smaller network (pruning, distillation, low-rank), not a new format of
    #:   the same one: its input stays on the frontier beside its children, so the passes after
    #:   it run on both and the unshrunk model competes in the same form.
    kind: ClassVar[Literal["transform", "branch", "alternative"]] = "transform"
    #: the artifact formats the pass reads; None: any
    formats: ClassVar[tuple[str, ...] | None] = ("onnx",)

    Config: ClassVar[type[PassConfig]] = PassConfig

    @classmethod
    def refuses(cls, format: str) -> str | None:
        """Why the pass cannot read an artifact of `format` (None: it can)."""
        if cls.formats is None or format in cls.formats:
            return None
        if cls.formats == TORCH_FORMATS:
            return f"{cls.name} trains PyTorch models; this artifact is {format}"
        fix = "; put onnx_conversion before it" if "onnx" in cls.formats else ""
        return f"it works on {', '.join(f.upper() for f in cls.formats)}, not {format}{fix}"

    @classmethod
    def check_format(cls, artifact: Artifact) -> None:
        """Skip an artifact the pass cannot read (the tree does not offer it one; a direct
        call may)."""
        why = cls.refuses(artifact.format)
        if why:
            raise PassSkipped(why)

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
