"""The Exporter interface and the lazy registry of deployment formats.

An exporter turns one registered version into a file another runtime or device runs: it reads
the source formats it names in `reads` and writes `format`. Verifying the result against the
source, timing it and registering it is the same for every format and lives in
exporters/export.py, so an exporter only makes the file and says how close it must be.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from optiserve.core.errors import ConfigError, OptiserveError, UnknownNameError
from optiserve.core.settings import Settings
from optiserve.core.types import Signature
from optiserve.passes.base import parse_options

EXPORTERS: dict[str, str] = {
    "torchscript": "optiserve.exporters.torchscript:TorchScriptExporter",
    "tflite": "optiserve.exporters.tflite:TFLiteExporter",
    "ort": "optiserve.exporters.ort_mobile:OrtMobileExporter",
    "openvino": "optiserve.exporters.openvino_ir:OpenVINOExporter",
}


class ExportError(OptiserveError):
    """An export that cannot be made or does not match its source; nothing is stored."""


@dataclass
class Source:
    """The version being exported: its file, format and signature, the rows the export is
    checked on, the rows formats that quantize calibrate on (the check rows unless the caller
    gave others), and a scratch folder."""

    path: Path
    format: str
    signature: Signature
    meta: dict[str, Any]
    rows: dict[str, np.ndarray]
    rows_described: str
    workdir: Path
    settings: Settings
    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    calibration_described: str = ""
    #: the in-memory model given to the Python API (an nn.Module for TorchScript scripting)
    obj: Any = None

    def __post_init__(self) -> None:
        if not self.calibration:
            self.calibration = self.rows
            self.calibration_described = f"the check rows, {self.rows_described}"


@dataclass(frozen=True)
class Tolerance:
    """How close the export's outputs must be to the source's on the check rows.

    Float exports are held to an absolute error (`atol`, plus `rtol` of the reference's
    magnitude); quantized exports to a mean cosine similarity per row and, for class scores,
    to the share of rows whose arg-max agrees."""

    atol: float | None = None
    rtol: float = 0.0
    min_cosine: float | None = None
    min_label_agreement: float | None = None

    def override(self, values: dict[str, Any] | None) -> Tolerance:
        """This tolerance with the caller's values (atol, rtol, min_cosine,
        min_label_agreement) in place of the exporter's."""
        if not values:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown tolerance '{unknown[0]}'.",
                              hint=f"Choose from: {', '.join(sorted(known))}.")
        try:
            clean = {k: None if v is None else float(v) for k, v in values.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"Tolerance values must be numbers (got {values}).") from None
        if any(v is not None and v < 0 for v in clean.values()):
            raise ConfigError(f"Tolerance values cannot be negative (got {values}).")
        return replace(self, **clean)

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"max abs error <= {self.atol:g}"
                         + (f" + {self.rtol:g} x |reference|" if self.rtol else ""))
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine:g}")
        if self.min_label_agreement is not None:
            parts.append(f"arg-max agreement >= {self.min_label_agreement:.0%}")
        return ", ".join(parts)


@dataclass
class Exported:
    """What an exporter made: the file to register, how close it must be, and what to say."""

    path: Path
    signature: Signature
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: files written by `--output` (name -> file); default: the registered file itself
    files: dict[str, Path] = field(default_factory=dict)


class Exporter:
    format: ClassVar[str]
    #: source artifact formats read directly; a source that is not one of them but converts to
    #: ONNX is converted first when "onnx" is listed here
    reads: ClassVar[tuple[str, ...]]
    #: the framework recorded for the exported version
    framework: ClassVar[str]

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def export(self, source: Source, config: BaseModel) -> Exported:
        raise NotImplementedError

    @classmethod
    def parse_config(cls, values: dict[str, Any] | None) -> BaseModel:
        return parse_options(cls.Config, values, f"the {cls.format} export", cls.format)


def get_exporter(format: str) -> type[Exporter]:
    if format not in EXPORTERS:
        raise UnknownNameError("export format", format, EXPORTERS)
    module, _, cls = EXPORTERS[format].partition(":")
    return getattr(importlib.import_module(module), cls)
