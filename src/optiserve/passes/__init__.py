"""Optimization passes: one class per file, a typed Config, a lazily imported registry."""

from optiserve.passes.base import PASSES, Artifact, Pass, PassContext, PassSkipped, get_pass

__all__ = ["PASSES", "Artifact", "Pass", "PassContext", "PassSkipped", "get_pass"]
