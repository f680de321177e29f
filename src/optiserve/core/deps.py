"""Optional dependencies: import them only inside the code that needs them, through require()."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from optiserve.core.errors import MissingExtraError


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import `module` or raise an error naming the feature and the exact `pip install`.
    Heavy frameworks all come through here, so their known chatter is routed to the debug
    log first (core/quiet.py)."""
    from optiserve.core.quiet import route_logs

    route_logs()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Only a missing top-level package is the user's to fix; a broken install is re-raised.
        missing = getattr(exc, "name", None) or ""
        if missing and module.split(".")[0] != missing.split(".")[0]:
            raise
        raise MissingExtraError(module, extra, feature) from exc


def available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None
