"""One optimization job, run in its own process: `python -m optiserve.jobs.worker RUN_ID PPID`.

The server's runner starts it and may kill it (cancel, hard timeout); everything it writes is
atomic (artifact files by rename, rows in transactions), so a kill leaves nothing half-written.
It dies with its server (PR_SET_PDEATHSIG), so a server killed mid-job leaves no orphan that
could finish the job behind the back of the restarted one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before prctl took effect
        os._exit(1)


def main(run_id: str, parent: int) -> int:
    _die_with_parent(parent)
    from optiserve.core.errors import OptiserveError
    from optiserve.optimizer.pipeline import Optimizer
    from optiserve.optimizer.request import OptimizeRequest
    from optiserve.registry.registry import Registry
    from optiserve.server.errors import http_status  # the status its server will answer

    registry = Registry()
    runs = registry.runs
    run = runs.get(run_id)
    last, measured = [0.0], [0]

    def progress(message: str, done: float) -> None:
        now = time.monotonic()
        if now - last[0] > 0.5 or done:  # one write per half second is plenty
            last[0] = now
            runs.progress(run_id, stage=message)

    def on_candidate(cand) -> None:
        measured[0] += 1
        runs.progress(run_id, candidate=cand.details(),
                      fraction=min(0.95, measured[0] / optimizer.planned()))

    try:
        request = OptimizeRequest.model_validate(run["request"])
        optimizer = Optimizer(registry, request, progress, run_id=run_id,
                              on_candidate=on_candidate, status_of=http_status)
        optimizer.run()
    except OptiserveError:
        return 0  # a user's error: recorded in the run by the optimizer
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
