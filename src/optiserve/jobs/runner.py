"""The job runner: a bounded pool that runs queued optimizations off the request path.

Job state lives in the registry database (`registry.runs`), so any server sharing the database
sees every job, and a restarted server finds its queue again. Each job runs in a child process
(`optiserve.jobs.worker`) that a supervisor thread watches:

- it beats the run's heartbeat, so other servers can tell a dead owner from a slow job;
- it kills the child when the run is cancelled (from any server: a flag in the row), or when
  it runs `job_grace_s` past OPTIMIZATION_MAX_TIME_MINUTES (the optimizer itself stops at the
  limit and keeps its best candidate; the kill is for a pass that does not come back);
- a child that dies without ending its run gets the run marked failed with its last words.

On start, runs whose owner is gone (its process on this host, or a heartbeat gone stale) are
marked failed with the reason; queued runs simply wait for a worker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from optiserve.core.settings import Settings
from optiserve.jobs import scratch
from optiserve.optimizer.request import OptimizeRequest
from optiserve.registry.registry import Registry
from optiserve.registry.runs import this_process

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, registry: Registry, settings: Settings | None = None, *,
                 poll_s: float = 0.25, heartbeat_s: float = 5.0):
        self.registry = registry
        self.runs = registry.runs
        self.settings = settings or registry.settings
        self.workers = self.settings.job_workers
        self.poll_s, self.heartbeat_s = poll_s, heartbeat_s
        self.owner = this_process()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        for run_id in self._reap():
            log.warning("optimization %s was interrupted (its owner is gone): marked failed",
                        run_id)
        swept = scratch.sweep(self.settings.home, keep=set(self.runs.active()))
        if swept:
            log.info("removed the scratch folders of %d ended run(s)", len(swept))
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"optiserve-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._beat, name="optiserve-job-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stop taking jobs. Each supervisor kills its running job and marks it failed (the
        server is going away; the job cannot finish)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=30)

    def submit(self, request: OptimizeRequest, model: str) -> str:
        run_id = self.runs.create(model, request.model_dump(mode="json"), status="queued")
        self._wake.set()
        return run_id

    # -- workers ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                run_id = self.runs.claim(self.owner)
            except Exception:  # the database is away for a moment: try again later
                log.exception("could not read the job queue")
                run_id = None
            if run_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._supervise(run_id)
            except Exception as exc:  # never let one job take a worker down
                log.exception("supervising %s failed", run_id)
                try:
                    self.runs.finish(run_id, "failed", error=f"The server failed to run it: "
                                     f"{type(exc).__name__}: {exc}", error_status=500)
                except Exception:  # the database is away: the reaper ends it later
                    log.exception("could not record the failure of %s", run_id)

    def _supervise(self, run_id: str) -> None:
        limit_s = 60 * self.settings.optimization_max_time_minutes + self.settings.job_grace_s
        # The job's temporary files, and its benchmark children's, go in its scratch folder
        # (TMPDIR), removed below however the job ends: a kill leaves nothing in /tmp.
        folder = scratch.make(self.settings.home, run_id)
        env = {**os.environ, **self.settings.environment(), "TMPDIR": str(folder)}
        try:
            self._run_child(run_id, env, limit_s)
        finally:
            scratch.remove(folder)

    def _run_child(self, run_id: str, env: dict, limit_s: float) -> None:
        with tempfile.TemporaryFile(mode="w+", dir=env["TMPDIR"]) as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "optiserve.jobs.worker", run_id, str(os.getpid())],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                cwd=str(Path.cwd()))
            with self._lock:
                self._children[run_id] = proc
            started = time.monotonic()
            ended_by = None
            try:
                while proc.poll() is None:
                    if self._stop.is_set():
                        _kill(proc)
                        self.runs.finish(run_id, "failed", error="The server stopped while this "
                                         "optimization ran. Submit it again.", error_status=503)
                        return
                    try:
                        run = self.runs.get(run_id)
                    except Exception:  # the database is away for a moment: keep watching
                        log.warning("cannot read job %s; retrying", run_id, exc_info=True)
                        self._stop.wait(1.0)
                        continue
                    if run["status"] not in ("queued", "running"):
                        _kill(proc)  # ended elsewhere (reaped by another server): stop it
                        return
                    if run["cancel_requested"]:
                        _kill(proc)
                        ended_by = ("cancelled", "Cancelled by request, during: {stage}.", 409)
                    elif time.monotonic() - started > limit_s:
                        _kill(proc)
                        ended_by = ("timeout", "Stopped after OPTIMIZATION_MAX_TIME_MINUTES="
                                    f"{self.settings.optimization_max_time_minutes} plus "
                                    f"{self.settings.job_grace_s:g} s of grace, during: "
                                    "{stage}. Candidates measured so far are listed.", 408)
                    else:
                        self._stop.wait(self.poll_s)
            finally:
                if proc.poll() is None:  # leaving for any reason: never leave a child behind
                    _kill(proc)
                with self._lock:
                    self._children.pop(run_id, None)
            stderr.seek(0)
            last_words = (stderr.read().strip().splitlines() or ["no output"])[-1][:500]
        run = self.runs.get(run_id)
        if ended_by:
            status, message, code = ended_by
            self.runs.finish(run_id, status, error=message.format(stage=run["stage"] or "start"),
                             error_status=code)
        elif run["status"] in ("queued", "running"):  # the child died without a word
            self.runs.finish(run_id, "failed", error=f"The optimization process exited with "
                             f"code {proc.returncode}: {last_words}", error_status=500)

    def _reap(self) -> list[str]:
        limit_s = 60 * self.settings.optimization_max_time_minutes + self.settings.job_grace_s
        return self.runs.reap(stale_after_s=self.settings.job_stale_s,
                              max_age_s=2 * limit_s + self.settings.job_stale_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                running = list(self._children)
            try:
                self.runs.heartbeat(running)
                self._reap()  # runs whose owner died
            except Exception:
                log.exception("job heartbeat failed")


def _kill(proc: subprocess.Popen) -> None:
    """The child and everything it started (benchmark processes): one process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
