"""Plain-subclass fakes for registry tests (no mocks)."""

from __future__ import annotations

from optiserve.core.types import Signature, TensorSpec
from optiserve.registry import Registry

SIG = Signature(inputs=(TensorSpec(name="x", dtype="float32", shape=(-1, 4)),),
                outputs=(TensorSpec(name="y", dtype="float32", shape=(-1, 3)),))


class FailingInsertRegistry(Registry):
    """Fails in the database step, after the artifact was stored (a plain subclass, no mock)."""

    stored_before_insert: bool | None = None

    def _insert(self, name, path, suffix, stored_as, *args, **kwargs):
        self.stored_before_insert = self.store.exists(stored_as[0])
        raise RuntimeError("database went away")

