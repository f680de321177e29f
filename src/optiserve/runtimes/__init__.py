"""Runtimes: things that can run an artifact. Each is loaded lazily by name."""

from optiserve.runtimes.base import Runtime, load_runtime, runtime_for

__all__ = ["Runtime", "load_runtime", "runtime_for"]
