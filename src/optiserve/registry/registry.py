"""Registry API: models and their immutable versions, backed by SQLAlchemy and an ArtifactStore.

SQLite under OPTISERVE_HOME by default, PostgreSQL when OPTISERVE_DATABASE_URL points at one.
A version appears whole or not at all: its file is stored first (atomically), then its rows are
written in one transaction; if the transaction fails, a file no other row uses is removed.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from optiserve.core.errors import ArtifactNotFound, ConfigError, ConflictError, ModelNotFound
from optiserve.core.settings import Settings, load_settings
from optiserve.core.types import Signature
from optiserve.registry.deployments import Deployments
from optiserve.registry.store import ArtifactStore
from optiserve.registry.keys import Keys
from optiserve.registry.runs import Runs
from optiserve.registry.tables import (ArtifactRow, DeploymentRow, ModelRow, VersionRow,
                                      check_model_name, lock_model)

_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATE_LOCK = threading.Lock()  # alembic's context is process-global


@dataclass(frozen=True)
class VersionInfo:
    """A model version as the rest of optiserve sees it."""

    model: str
    version: int
    framework: str
    format: str
    artifact_id: str
    sha256: str
    size_bytes: int
    uri: str
    signature: Signature
    parent: int | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    status: str = "ready"
    created_at: datetime | None = None

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


@dataclass(frozen=True)
class ModelInfo:
    name: str
    created_at: datetime | None
    versions: list[VersionInfo]

    @property
    def latest(self) -> VersionInfo | None:
        ready = [v for v in self.versions if v.status == "ready"]
        return ready[-1] if ready else None


class Registry:
    """Models, versions, artifacts; optimization runs (`.runs`), API keys (`.keys`) and
    deployments (`.deployments`)."""

    def __init__(self, settings: Settings | None = None, *, database_url: str | None = None,
                 artifact_url: str | None = None):
        self.settings = settings or load_settings()
        url = database_url or self.settings.registry_url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.store = ArtifactStore(artifact_url or self.settings.artifacts_location,
                                   cache_dir=self.settings.home / "artifact-cache")
        self._migrate()
        self.runs = Runs(self._session)
        self.keys = Keys(self._session)
        self.deployments = Deployments(self._session)

    # -- schema ---------------------------------------------------------------------------
    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with _MIGRATE_LOCK:
            for attempt in range(3):
                try:
                    with self.engine.begin() as conn:
                        if conn.dialect.name == "postgresql":  # one migrator per database
                            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727171)")
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, "head")
                    return
                except (OperationalError, IntegrityError, ProgrammingError):
                    # another process created the schema at the same moment: check again
                    if attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))

    def close(self) -> None:
        self.engine.dispose()

    # -- versions -------------------------------------------------------------------------
    def add_version(self, name: str, path: str | Path, *, framework: str, format: str,
                    signature: Signature, parent: int | None = None,
                    passes: list[dict] | None = None, metrics: dict | None = None,
                    meta: dict | None = None, status: str = "ready",
                    suffix: str | None = None) -> VersionInfo:
        """Store `path` as the next version of `name` (created if new). All or nothing.
        The stored file gets `suffix` (default: the path's own)."""
        check_model_name(name)
        suffix = suffix or Path(path).suffix or f".{format}"
        # The file goes in the model's own folder, so only this model's writers (serialized
        # by lock_model) ever create or remove it.
        stored = self.store.put(path, suffix, folder=name)
        try:
            for attempt in range(8):
                try:
                    return self._insert(name, path, suffix, stored, framework, format,
                                        signature, parent, passes or [], metrics or {},
                                        meta or {}, status)
                except (IntegrityError, OperationalError):
                    # another writer took the same model name or version number: retry
                    if attempt == 7:
                        raise
                    time.sleep(0.02 * 2 ** attempt * (1 + random.random()))
        except BaseException:
            with self._session.begin() as s:
                lock_model(s, name)
                if not s.scalar(select(func.count()).where(ArtifactRow.uri == stored[0])):
                    self.store.delete(stored[0])
            raise
        raise AssertionError("unreachable")

    def _insert(self, name, path, suffix, stored, framework, format, signature, parent,
                passes, metrics, meta, status) -> VersionInfo:
        uri, sha, size = stored
        with self._session.begin() as s:
            model = lock_model(s, name)
            if not self.store.exists(uri):  # a delete of this model removed it meanwhile
                self.store.put(path, suffix, folder=name)
            if model is None:
                model = ModelRow(name=name)
                s.add(model)
                s.flush()
            number = (s.scalar(select(func.max(VersionRow.version))
                               .where(VersionRow.model_id == model.id)) or 0) + 1
            parent_id = None
            if parent is not None:
                parent_id = s.scalar(select(VersionRow.id).where(
                    VersionRow.model_id == model.id, VersionRow.version == parent))
            art_id = f"{name}-v{number}"
            if s.get(ArtifactRow, art_id) is not None:  # a row left by an older optiserve's
                art_id = f"{art_id}-{secrets.token_hex(3)}"  # delete race: never collide
            art = ArtifactRow(id=art_id, sha256=sha, size_bytes=size, format=format, uri=uri)
            s.add(art)
            row = VersionRow(model_id=model.id, version=number, framework=framework,
                             artifact_id=art.id, signature=signature.model_dump(mode="json"),
                             parent_id=parent_id, passes=passes, metrics=metrics, meta=meta,
                             status=status)
            s.add(row)
            s.flush()
            return self._info(name, row, art, parent)

    def _info(self, name: str, row: VersionRow, art: ArtifactRow,
              parent: int | None) -> VersionInfo:
        return VersionInfo(
            model=name, version=row.version, framework=row.framework, format=art.format,
            artifact_id=art.id, sha256=art.sha256, size_bytes=art.size_bytes, uri=art.uri,
            signature=Signature.model_validate(row.signature), parent=parent,
            passes=list(row.passes or []), metrics=dict(row.metrics or {}),
            meta=dict(row.meta or {}), status=row.status, created_at=row.created_at,
        )

    def _versions(self, s: Session, model: ModelRow) -> list[VersionInfo]:
        by_id = {v.id: v.version for v in model.versions}
        return [self._info(model.name, v, v.artifact, by_id.get(v.parent_id))
                for v in model.versions]

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of a model, oldest first."""
        with self._session() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if model is None:
                raise ModelNotFound(name, known=s.scalars(select(ModelRow.name)).all())
            return self._versions(s, model)

    def get(self, name: str, version: int | None = None) -> VersionInfo:
        """A version; by default the latest one that is ready (not a rejected candidate)."""
        versions = self.versions(name)
        if version is None:
            ready = [v for v in versions if v.status == "ready"]
            if ready:
                return ready[-1]
            raise ModelNotFound(name, known=[name], detail=(
                f"Every version of model '{name}' is a rejected candidate or an export.",
                f"Name one explicitly, e.g. {name}:{versions[-1].version}, or register again."))
        else:
            for v in versions:
                if v.version == version:
                    return v
        raise ModelNotFound(name, version, known=[name])

    def resolve(self, ref: str) -> VersionInfo:
        """'name' or 'name:version'."""
        name, _, ver = ref.partition(":")
        if ver and not (ver.isascii() and ver.isdigit()):
            raise ConfigError(f"Version {ver!r} in {ref!r} is not a number.",
                              hint="Write MODEL or MODEL:VERSION, e.g. churn:2.")
        return self.get(name, int(ver) if ver else None)

    def models(self) -> list[ModelInfo]:
        with self._session() as s:
            rows = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [ModelInfo(m.name, m.created_at, self._versions(s, m)) for m in rows]

    def path(self, version: VersionInfo) -> Path:
        """Local path of a version's artifact file."""
        return self.store.local_path(version.uri, version.sha256)

    def original(self, version: VersionInfo) -> VersionInfo:
        """Walk the lineage back to the version that was registered from the user's file."""
        while version.parent is not None:
            version = self.get(version.model, version.parent)
        return version

    # -- deletion and downloads -----------------------------------------------------------
    def artifact(self, artifact_id: str) -> VersionInfo:
        """The version that owns an artifact id (e.g. churn-v2)."""
        with self._session() as s:
            row = s.scalar(select(VersionRow).where(VersionRow.artifact_id == artifact_id))
            if row is None:
                raise ArtifactNotFound(artifact_id)
            name, version = row.model.name, row.version
        return self.get(name, version)

    def delete_model(self, name: str) -> int:
        """Delete a model, its versions and the files no other version shares; returns the
        number of versions deleted. Rows go in one transaction, files after it. Refused while
        a deployment serves it or an optimization run uses it."""
        active = self.runs.active_for_model(name)
        if active:
            raise ConflictError(f"Model '{name}' is used by optimization(s) {', '.join(active)}.",
                                hint="Wait for them to finish, or cancel them: optiserve runs "
                                f"cancel {active[0]} (or DELETE /api/v1/inference/optimizations/"
                                f"{active[0]}).")
        with self._session.begin() as s:
            model = lock_model(s, name)  # no version can be added until this commits
            if model is None:
                raise ModelNotFound(name, known=s.scalars(select(ModelRow.name)).all())
            deployed = self.deployments.of_model(s, name)
            if deployed:
                raise ConflictError(
                    f"Model '{name}' is served by deployment {', '.join(deployed)}.",
                    hint=f"Undeploy it first: optiserve undeploy {deployed[0]} (or DELETE "
                    f"/api/v1/deployments/{deployed[0]}).")
            uris = {v.artifact.uri for v in model.versions}
            arts = [v.artifact_id for v in model.versions]
            count = len(model.versions)
            s.execute(delete(VersionRow).where(VersionRow.model_id == model.id))
            s.execute(delete(ArtifactRow).where(ArtifactRow.id.in_(arts)))
            s.execute(delete(ModelRow).where(ModelRow.id == model.id))
            # Files go while the lock is held (a version added right after must store its
            # file again, not find it about to vanish), renamed aside until the commit: put
            # back if it fails, so no row is ever left naming a missing file.
            still_used = set(s.scalars(select(ArtifactRow.uri).where(ArtifactRow.uri.in_(uris))))
            with self.store.removing(uris - still_used):
                s.commit()
        return count

    def problems(self) -> list[str]:
        """What is inconsistent between the rows and the artifact files (empty: nothing):
        artifact rows no version uses, files a row names but the store lacks, files in a
        local store that no row names, deployments of a model that is gone. The hardening
        tests and benchmarks/hardening.py run it after every race and kill."""
        found = []
        with self._session() as s:
            used = set(s.scalars(select(VersionRow.artifact_id)))
            arts = s.execute(select(ArtifactRow.id, ArtifactRow.uri)).all()
            models = set(s.scalars(select(ModelRow.name)))
            deployed = s.execute(select(DeploymentRow.name, DeploymentRow.model_name)).all()
        found += [f"artifact row '{a}' is used by no version" for a, _ in arts if a not in used]
        uris = {uri for _, uri in arts}
        if self.store.local:
            found += [f"artifact file of '{a}' is missing" for a, uri in arts
                      if not Path(uri).exists()]
            found += [f"file {p.name} in the artifact store is named by no row"
                      for p in self.store.files() if str(p.resolve()) not in uris]
        found += [f"deployment '{d}' serves model '{m}', which is gone"
                  for d, m in deployed if m not in models]
        return found


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
