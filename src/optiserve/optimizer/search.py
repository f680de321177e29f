"""The search over candidates, kept apart from the passes: it only reads their configs.

A config field left unset (None) that declares `search=[...]` in its json_schema_extra becomes
one candidate per value; several such fields multiply. Two more keys shape that:

- `when={"field": value}`: the field is searched only in configs where the other fields have
  those values (e.g. the calibration method only for static quantization). Elsewhere it stays
  None and the pass ignores it.
- `retry=True`: an accuracy knob, not a speed one. Only the first value is tried; the next one
  is tried only when a candidate with the previous one failed the accuracy gate (`fallbacks`).
  Calibration methods cost the same at run time, so trying all of them up front would only
  spend the time budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from optiserve.core.errors import UnknownNameError
from optiserve.passes.base import PASSES, Pass


@dataclass(frozen=True)
class Searched:
    values: tuple[Any, ...]
    when: dict[str, Any]
    retry: bool

    def applies(self, config: BaseModel) -> bool:
        return all(getattr(config, k, None) == v for k, v in self.when.items())


def searched_fields(pass_cls: type[Pass]) -> dict[str, Searched]:
    out = {}
    for name, info in pass_cls.Config.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "search" in extra:
            out[name] = Searched(tuple(extra["search"]), dict(extra.get("when", {})),
                                 bool(extra.get("retry", False)))
    return out


def expand(pass_cls: type[Pass], values: dict[str, Any] | None) -> list[BaseModel]:
    """The configs to try first for one pass: the given values, with unset searched fields
    expanded (fields in declaration order, so `when` can name an earlier field)."""
    base = pass_cls.parse_config(values)
    configs = [base]
    for name, field in searched_fields(pass_cls).items():
        if getattr(base, name) is not None:
            continue
        grown = []
        for config in configs:
            if not field.applies(config):
                grown.append(config)
                continue
            tried = field.values[:1] if field.retry else field.values
            grown += [config.model_copy(update={name: v}) for v in tried]
        configs = grown
    return configs


def fallbacks(pass_cls: type[Pass], values: dict[str, Any] | None,
              failed: BaseModel) -> list[BaseModel]:
    """Configs worth trying after `failed` missed the accuracy gate: for each retry field the
    user left open, its next value (one field changed at a time)."""
    base = pass_cls.parse_config(values)
    out = []
    for name, field in searched_fields(pass_cls).items():
        if not field.retry or getattr(base, name) is not None or not field.applies(failed):
            continue
        current = getattr(failed, name)
        at = field.values.index(current) if current in field.values else len(field.values)
        if at + 1 < len(field.values):
            out.append(failed.model_copy(update={name: field.values[at + 1]}))
    return out


# The passes `optimizations: ["auto"]` stands for, in order. Each is tried only where it applies
# (a pass with nothing to do on a model, or that this machine cannot run, is skipped and says
# why); every node of the tree is a candidate, the FP32 ones included.
AUTO = ("onnx_conversion", "graph_optimization", "quantization", "qat", "openvino", "fp16",
        "tensorrt")


def chain(names: list[str]) -> list[str]:
    """The requested pass names with "auto" spelled out (passes already named are kept once);
    an unknown name is an error listing the known ones."""
    out: list[str] = []
    for name in names:
        if name != "auto" and name not in PASSES:
            raise UnknownNameError("optimization", name, ["auto", *PASSES])
        for n in (AUTO if name == "auto" else (name,)):
            if n not in out:
                out.append(n)
    return out

