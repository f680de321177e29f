"""optiserve: make a trained model smaller, faster and served.

The package root stays light: nothing here imports torch, tensorflow, scikit-learn or other
heavy frameworks; they load inside the code that needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Registry": "optiserve.registry.registry",
    "register": "optiserve.api",
    "optimize": "optiserve.api",
    "benchmark": "optiserve.api",
    # optiserve.export is the API function; the formats live in optiserve.exporters
    "export": "optiserve.api",
    "OptimizeRequest": "optiserve.optimizer.request",
    "DatasetSpec": "optiserve.data.sources",
    "Settings": "optiserve.core.settings",
    "load_settings": "optiserve.core.settings",
    "OptiserveError": "optiserve.core.errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optiserve' has no attribute {name!r}")
