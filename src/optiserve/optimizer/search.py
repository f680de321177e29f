"""The search over candidates, kept apart from the passes: it only reads their configs.

A config field left unset (None) that declares `search=[...]` becomes one candidate per value;
several such fields multiply.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel

from optiserve.passes.base import Pass


def searched_fields(pass_cls: type[Pass]) -> dict[str, list[Any]]:
    out = {}
    for name, info in pass_cls.Config.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "search" in extra:
            out[name] = list(extra["search"])
    return out


def expand(pass_cls: type[Pass], values: dict[str, Any] | None) -> list[BaseModel]:
    """The configs to try for one pass: the given values, with unset searched fields expanded."""
    base = pass_cls.parse_config(values)
    open_fields = {k: v for k, v in searched_fields(pass_cls).items() if getattr(base, k) is None}
    if not open_fields:
        return [base]
    keys = list(open_fields)
    return [base.model_copy(update=dict(zip(keys, combo)))
            for combo in itertools.product(*(open_fields[k] for k in keys))]
