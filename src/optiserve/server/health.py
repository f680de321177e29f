"""What /api/v1/health reports: the database reachable, and storage writable with room to
spare. A server whose disk is full still serves inference (it is alive, and ready), so storage
makes the status "degraded", not a failure; what cannot be written is refused with 507."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import text

from optiserve.core.errors import StorageFull


def storage(home: Path, min_free_mb: float) -> tuple[bool, str]:
    """(ok, what is wrong): a small file written, synced and removed under `home`, and at
    least `min_free_mb` free on its disk."""
    probe = home / f".health-{os.getpid()}"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"optiserve")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return False, f"OPTISERVE_HOME cannot be written ({exc.strerror or type(exc).__name__})"
    finally:
        probe.unlink(missing_ok=True)
    free_mb = shutil.disk_usage(home).free / 1e6
    if free_mb < min_free_mb:
        return False, (f"{free_mb:.0f} MB free on the disk of OPTISERVE_HOME, less than "
                       f"OPTISERVE_MIN_FREE_MB={min_free_mb:g}")
    return True, ""


def require_space(home: Path, min_free_mb: float) -> None:
    """Refuse (507) work that writes files when the disk is short of room, before writing."""
    ok, _ = storage(home, min_free_mb)
    if not ok:
        raise StorageFull()


def report(registry, settings, job_workers: int) -> tuple[int, dict]:
    """(HTTP status, body) of /api/v1/health."""
    try:
        with registry.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return 503, {"error": f"The registry database is unreachable: {type(exc).__name__}.",
                     "status": "unavailable"}
    ok, problem = storage(settings.home, settings.min_free_mb)
    body = {"status": "ok" if ok else "degraded", "database": registry.engine.dialect.name,
            "storage": "ok" if ok else problem, "job_workers": job_workers}
    return 200, body
