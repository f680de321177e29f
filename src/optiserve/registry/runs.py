"""Optimization runs in the registry database: the job state every face reads.

A run is `queued` (server jobs only), then `running`, then one of the terminal states. Every
write that ends a run is conditional on the run still being active, so a late writer (a worker
whose job was cancelled, or an orphan whose server restarted) can never overwrite the outcome.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from optiserve.core.errors import ConflictError, RunNotFound
from optiserve.registry.tables import RunRow, utcnow

ACTIVE = ("queued", "running")
TERMINAL = ("completed", "failed", "rejected", "cancelled", "timeout")


def this_process() -> str:
    """Owner id of runs started here: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runs:
    """Create, follow, cancel and finish optimization runs."""

    def __init__(self, session: sessionmaker):
        self._session = session

    def create(self, model: str, request: dict, *, status: str = "running",
               owner: str | None = None) -> str:
        run_id = f"opt-{secrets.token_hex(6)}"
        now = utcnow()
        with self._session.begin() as s:
            s.add(RunRow(id=run_id, model_name=model, status=status, request=request,
                         owner=owner or (None if status == "queued" else this_process()),
                         started_at=None if status == "queued" else now, candidates=[],
                         progress=0.0))
        return run_id

    def get(self, run_id: str) -> dict[str, Any]:
        with self._session() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise RunNotFound(run_id)
            return _as_dict(row)

    def list(self, *, model: str | None = None, status: str | None = None,
             limit: int = 50) -> list[dict[str, Any]]:
        q = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
        if model:
            q = q.where(RunRow.model_name == model)
        if status:
            q = q.where(RunRow.status == status)
        with self._session() as s:
            return [_as_dict(r) for r in s.scalars(q)]

    def active_for_model(self, model: str) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(RunRow.id).where(
                RunRow.model_name == model, RunRow.status.in_(ACTIVE))))

    def active(self) -> list[str]:
        """Ids of the runs queued or running, on any server."""
        with self._session() as s:
            return list(s.scalars(select(RunRow.id).where(RunRow.status.in_(ACTIVE))))

    # -- progress of a running run --------------------------------------------------------
    def progress(self, run_id: str, *, stage: str | None = None,
                 fraction: float | None = None, candidate: dict | None = None) -> None:
        with self._session.begin() as s:
            row = s.get(RunRow, run_id)
            if row is None or row.status not in ACTIVE:
                return
            if stage is not None:
                row.stage = stage[:300]
            if fraction is not None:
                row.progress = max(0.0, min(1.0, fraction))
            if candidate is not None:
                row.candidates = [*(row.candidates or []), candidate]

    def finish(self, run_id: str, status: str, *, report: dict | None = None,
               error: str | None = None, error_status: int | None = None) -> bool:
        """End an active run; False (and nothing written) when it had already ended."""
        assert status in TERMINAL, status
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(),
                                  "error": (error or None) and error[:2000],
                                  "error_status": error_status}
        if report is not None:
            values["report"] = report
        if status == "completed":
            values["progress"] = 1.0
        with self._session.begin() as s:
            done = s.execute(update(RunRow).where(RunRow.id == run_id,
                                                  RunRow.status.in_(ACTIVE)).values(**values))
            return done.rowcount == 1

    # -- the job queue ----------------------------------------------------------------------
    def claim(self, owner: str) -> str | None:
        """Take the oldest queued run for `owner`; None when the queue is empty."""
        with self._session() as s:
            queued = list(s.scalars(select(RunRow.id).where(RunRow.status == "queued")
                                    .order_by(RunRow.created_at).limit(8)))
        for run_id in queued:
            with self._session.begin() as s:
                now = utcnow()
                took = s.execute(update(RunRow).where(
                    RunRow.id == run_id, RunRow.status == "queued").values(
                    status="running", owner=owner, started_at=now, heartbeat_at=now,
                    stage="starting"))
                if took.rowcount == 1:
                    return run_id
        return None

    def heartbeat(self, run_ids: list[str]) -> None:
        if run_ids:
            with self._session.begin() as s:
                s.execute(update(RunRow).where(RunRow.id.in_(run_ids),
                                               RunRow.status == "running")
                          .values(heartbeat_at=utcnow()))

    def request_cancel(self, run_id: str) -> dict[str, Any]:
        """A queued run is cancelled at once; a running one is flagged for its owner to stop."""
        run = self.get(run_id)
        if run["status"] in TERMINAL:
            raise ConflictError(f"Optimization {run_id} has already ended ({run['status']}).",
                                hint="Only queued or running optimizations can be cancelled.")
        if run["status"] == "queued" and self.finish(run_id, "cancelled",
                                                     error="Cancelled before it started."):
            return self.get(run_id)
        # running (or claimed by a worker a moment ago): its owner stops it
        with self._session.begin() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id, RunRow.status == "running")
                      .values(cancel_requested=True))
        return self.get(run_id)

    def reap(self, *, stale_after_s: float, max_age_s: float) -> list[str]:
        """Fail the running runs nobody runs any more: their process on this host is gone,
        their server has not beaten the heartbeat for `stale_after_s`, or (runs without a
        heartbeat: the CLI's) they started more than `max_age_s` ago. Clocks of servers that
        share a database must agree (NTP) to well within `stale_after_s`."""
        host = socket.gethostname()
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        too_old = utcnow() - timedelta(seconds=max_age_s)
        reaped = []
        with self._session() as s:
            rows = list(s.scalars(select(RunRow).where(RunRow.status == "running")))
        for row in rows:
            owner_host, _, pid = (row.owner or "").rpartition(":")
            reason = None
            if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                reason = (f"the process that ran it (pid {pid}) stopped before it finished, "
                          f"during: {row.stage or 'start-up'}")
            elif row.heartbeat_at is not None and row.heartbeat_at < cutoff:
                reason = (f"its server ({row.owner}) stopped beating its heartbeat at "
                          f"{row.heartbeat_at.isoformat(timespec='seconds')}, during: "
                          f"{row.stage or 'start-up'}")
            elif row.heartbeat_at is None and (row.started_at or row.created_at) < too_old:
                began = (row.started_at or row.created_at).isoformat(timespec="seconds")
                reason = (f"it started at {began} in {row.owner or 'an unknown process'} and "
                          "is past any time limit")
            if reason and self.finish(row.id, "failed", error=f"Interrupted: {reason}. "
                                      "Submit the optimization again.", error_status=500):
                reaped.append(row.id)
        return reaped


def _as_dict(row: RunRow) -> dict[str, Any]:
    return {"id": row.id, "model": row.model_name, "status": row.status,
            "request": row.request, "report": row.report, "error": row.error,
            "error_status": row.error_status, "stage": row.stage, "progress": row.progress,
            "candidates": list(row.candidates or []), "owner": row.owner,
            "cancel_requested": bool(row.cancel_requested), "created_at": row.created_at,
            "started_at": row.started_at, "finished_at": row.finished_at,
            "heartbeat_at": row.heartbeat_at}
