"""The registry: models, immutable versions, artifacts and optimization runs."""

from optiserve.registry.registry import ModelInfo, Registry, VersionInfo

__all__ = ["ModelInfo", "Registry", "VersionInfo"]
