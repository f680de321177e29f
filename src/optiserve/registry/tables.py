"""SQLAlchemy tables. Schema changes go through Alembic (registry/migrations)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String,
                        UniqueConstraint, false, select, true, update)
from sqlalchemy.types import DateTime as _DateTime
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from optiserve.core.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> str:
    """The one rule for model and deployment names (rows are looked up by them)."""
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"Model name {name!r} is not allowed.",
            hint="Use letters, digits, '_', '.' and '-' (at most 128, starting with a letter "
            "or digit).",
        )
    return name


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class DateTime(TypeDecorator):
    """UTC datetimes that come back timezone-aware on every backend (SQLite drops the zone)."""

    impl = _DateTime
    cache_ok = True

    def __init__(self, timezone: bool = True):
        super().__init__(timezone=True)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model", order_by="VersionRow.version", cascade="all, delete-orphan"
    )


class ArtifactRow(Base):
    """A stored file. Content-addressed: identical bytes share one file."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    format: Mapped[str] = mapped_column(String(32), nullable=False)
    uri: Mapped[str] = mapped_column(String(1024), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VersionRow(Base):
    """An immutable model version: one artifact, its signature, lineage and metrics."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    framework: Mapped[str] = mapped_column(String(32), nullable=False)
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id"), nullable=False)
    signature: Mapped[dict] = mapped_column(JSON, nullable=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    passes: Mapped[list] = mapped_column(JSON, default=list)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[ModelRow] = relationship(back_populates="versions")
    artifact: Mapped[ArtifactRow] = relationship()


class RunRow(Base):
    """One optimization run (a job when the server runs it): request, status, progress, the
    candidates measured so far, the report. `owner` is "host:pid" of the process running it;
    servers beat `heartbeat_at` so a run whose owner died can be told from a slow one."""

    __tablename__ = "optimization_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    request: Mapped[dict] = mapped_column(JSON, nullable=False)
    report: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    stage: Mapped[str | None] = mapped_column(String(300), nullable=True)
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)
    candidates: Mapped[list | None] = mapped_column(JSON, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    error_status: Mapped[int | None] = mapped_column(Integer, nullable=True)


class KeyRow(Base):
    """An API key: the id is public (shown in lists), only the secret's sha256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    scopes: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeploymentRow(Base):
    """What a server serves under a name: a registered model, a version policy and the serving
    settings (batching, instances), as a validated DeploymentSpec in `spec`."""

    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    loaded: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


def lock_model(s, name: str) -> ModelRow | None:
    """The model row, locked until the caller's transaction ends, so that adding a version,
    deleting the model and deploying it are serialized per model on every database.
    PostgreSQL's SELECT ... FOR UPDATE locks the row; SQLite ignores FOR UPDATE, so a no-op
    UPDATE first takes SQLite's write lock, which holds off every other writer until commit
    (and still takes it when the model does not exist yet)."""
    s.execute(update(ModelRow).where(ModelRow.name == name).values(name=ModelRow.name))
    return s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
