"""Run one pass the way the optimizer does: an Artifact in, a scratch folder, settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optiserve.convert.onnx_io import import_onnx
from optiserve.passes import Artifact, PassContext, get_pass


def onnx_artifact(path: Path) -> Artifact:
    imported = import_onnx(path)
    return Artifact(path=path, format="onnx", signature=imported.signature, meta=imported.meta)


def run_pass(name: str, artifact: Artifact, settings, workdir: Path, options: dict | None = None,
             sample: dict[str, np.ndarray] | None = None) -> Artifact:
    cls = get_pass(name)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, settings=settings, sample=sample or {})
    return cls().run(artifact, cls.parse_config(options), ctx)
