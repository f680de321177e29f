"""Deployments: what the inference server serves under a name, and how.

A deployment names a registered model, a version policy (the latest N ready versions, or
specific ones) and the serving settings of each version: dynamic batching, queue bound,
timeout, instances and their threads. Servers load every deployment when they start and on
`POST /v2/repository/models/{name}/load`; a model cannot be deleted while it is deployed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from optiserve.core.errors import ConfigError, OptiserveError
from optiserve.registry.tables import DeploymentRow, ModelRow, utcnow


class DeploymentNotFound(OptiserveError):
    status = 404

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"No deployment '{name}'.",
            hint=(f"Deployments: {', '.join(sorted(known))}." if known else "None exist yet.")
            + f" Create one with: optiserve deploy {name}")
        self.name = name


class VersionPolicy(BaseModel):
    """Which versions serve: the latest N ready ones (default 1), or a list of numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(None, ge=1, le=16, description="Serve the newest N ready versions.")
    specific: list[int] | None = Field(None, min_length=1, max_length=16,
                                       description="Serve exactly these version numbers.")

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        if self.latest is not None and self.specific is not None:
            raise ValueError("give either 'latest' or 'specific', not both")
        if self.latest is None and self.specific is None:
            object.__setattr__(self, "latest", 1)
        return self

    def describe(self) -> str:
        return f"latest {self.latest}" if self.specific is None else \
            "versions " + ", ".join(map(str, self.specific))


class DeploymentSpec(BaseModel):
    """How one served model runs. Batching follows Triton's dynamic batcher: with
    `max_queue_delay_us` 0 an idle instance takes whatever is queued and never waits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="The registered model to serve.")
    versions: VersionPolicy = Field(default_factory=VersionPolicy,
                                    description="Which of its versions serve.")
    max_batch_size: int = Field(64, ge=0, le=4096,
                                description="Most rows run in one call; 0 turns batching off "
                                "(also off by itself when the model has no dynamic batch "
                                "dimension).")
    max_queue_delay_us: int = Field(0, ge=0, le=10_000_000,
                                    description="How long an incomplete batch may wait for "
                                    "more requests; 0 = never wait while a request is queued.")
    preferred_batch_sizes: list[int] = Field(default_factory=list, max_length=16,
                                             description="Batch sizes to cut at when more is "
                                             "queued than fits (sizes a compiled engine likes).")
    max_queue_size: int = Field(1024, ge=1, le=1_000_000,
                                description="Requests waiting per version; beyond it the "
                                "server answers 429 / RESOURCE_EXHAUSTED with Retry-After.")
    timeout_ms: int = Field(30_000, ge=0, le=3_600_000,
                            description="A request still queued after this long fails with "
                            "504 / DEADLINE_EXCEEDED; 0 = no limit.")
    instances: int = Field(1, ge=1, le=64,
                           description="Sessions per version, run in threads.")
    threads: int | None = Field(None, ge=1, le=256,
                                description="Intra-op threads per instance; default: the "
                                "machine's cores divided among the instances.")
    runtime: str | None = Field(None, description="Runtime to run the artifact with; default "
                                "the one its format runs in natively.")
    allow_nan: bool = Field(False, description="Let NaN and infinity through to the model "
                            "(for models trained with missing values); refused by default.")

    @model_validator(mode="after")
    def _sizes(self) -> DeploymentSpec:
        bad = [s for s in self.preferred_batch_sizes
               if s < 1 or (self.max_batch_size and s > self.max_batch_size)]
        if bad:
            raise ValueError(f"preferred batch size {bad[0]} is outside 1..max_batch_size")
        return self

    def threads_per_instance(self, cores: int | None = None) -> int:
        """Instances x threads never exceed the cores (no oversubscription) unless asked."""
        cores = cores or os.cpu_count() or 1
        return self.threads or max(1, cores // self.instances)


def parse_spec(data: dict) -> DeploymentSpec:
    """A DeploymentSpec from JSON, with pydantic's errors as one readable ConfigError."""
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "deployment"
        raise ConfigError(f"Deployment setting '{where}' is invalid: {err.get('msg')}.",
                          hint="See DeploymentSpec in the API docs (/docs) for the fields."
                          ) from None


@dataclass(frozen=True)
class Deployment:
    name: str
    spec: DeploymentSpec
    created_at: datetime | None
    updated_at: datetime | None


def _info(row: DeploymentRow) -> Deployment:
    return Deployment(row.name, DeploymentSpec.model_validate(row.spec), row.created_at,
                      row.updated_at)


class Deployments:
    def __init__(self, session: sessionmaker):
        self._session = session

    def put(self, name: str, spec: DeploymentSpec) -> Deployment:
        """Create or replace a deployment; its model must exist."""
        from optiserve.core.errors import ModelNotFound
        from optiserve.registry.registry import check_model_name

        check_model_name(name)
        with self._session.begin() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == spec.model)
                             .with_for_update())
            if model is None:
                raise ModelNotFound(spec.model, known=s.scalars(select(ModelRow.name)).all())
            row = s.get(DeploymentRow, name)
            if row is None:
                row = DeploymentRow(name=name, model_name=spec.model, created_at=utcnow())
                s.add(row)
            row.model_name, row.spec = spec.model, spec.model_dump(mode="json")
            row.updated_at = utcnow()
            s.flush()
            return _info(row)

    def get(self, name: str) -> Deployment:
        with self._session() as s:
            row = s.get(DeploymentRow, name)
            if row is None:
                raise DeploymentNotFound(name, s.scalars(select(DeploymentRow.name)).all())
            return _info(row)

    def list(self) -> list[Deployment]:
        with self._session() as s:
            return [_info(r) for r in
                    s.scalars(select(DeploymentRow).order_by(DeploymentRow.name))]

    def of_model(self, s, model: str) -> list[str]:
        """Names of the deployments that serve `model` (inside the caller's transaction)."""
        return list(s.scalars(select(DeploymentRow.name)
                              .where(DeploymentRow.model_name == model)))

    def remove(self, name: str) -> Deployment:
        with self._session.begin() as s:
            row = s.get(DeploymentRow, name)
            if row is None:
                raise DeploymentNotFound(name, s.scalars(select(DeploymentRow.name)).all())
            info = _info(row)
            s.delete(row)
            return info
