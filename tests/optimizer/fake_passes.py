"""A plain pass for search tests: it copies the ONNX model, so its candidates are real FP32
artifacts whose only difference is their label (which PinnedOptimizer pins numbers to)."""

from __future__ import annotations

import shutil
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optiserve.passes.base import Artifact, Pass, PassContext


class Knob(Pass):
    name = "knob"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        speed: Literal["fast", "slow"] | None = Field(
            None, description="searched up front", json_schema_extra={"search": ["fast", "slow"]})
        care: int | None = Field(None, description="an accuracy knob, tried in turn on failure",
                                 json_schema_extra={"search": [1, 2, 3], "retry": True})

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        out = ctx.workdir / "copy.onnx"
        shutil.copy(artifact.path, out)
        return artifact.then(out, self.name, config, notes=[f"knob {config.speed}/{config.care}"])


class Broken(Pass):
    """Writes a file ONNX Runtime refuses (how=garbage), or raises as a buggy pass would."""

    name = "broken"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        how: Literal["garbage", "raise"] = Field("garbage", description="how it fails")

    def run(self, artifact: Artifact, config: Config, ctx: PassContext) -> Artifact:
        if config.how == "raise":
            raise RuntimeError("internal error in a third-party converter")
        out = ctx.workdir / "broken.onnx"
        out.write_bytes(b"not an onnx model")
        return artifact.then(out, self.name, config)
