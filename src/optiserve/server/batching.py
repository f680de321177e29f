"""Dynamic batching: requests for one served version queue here, and each instance's thread
takes what is queued, runs it as one batch and splits the outputs back to the requests.

It follows Triton's dynamic batcher. With `max_queue_delay_us` 0 an idle instance takes
whatever is queued and never waits; with a delay, an incomplete batch waits until it is full,
reaches a preferred size, or its oldest request has waited that long. Only requests whose
inputs agree on every dimension but the first (and ask for the same outputs) share a batch,
so requests of different lengths are grouped, never padded into each other. The queue is
bounded (`QueueFull`, 429 / RESOURCE_EXHAUSTED) and a request still queued at its deadline
fails (`RequestTimeout`, 504 / DEADLINE_EXCEEDED).

Instances run in threads: ONNX Runtime and OpenVINO release the GIL while they compute, so
one process serves several sessions in parallel without copying the model per process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from optiserve.core.errors import OptiserveError, first_line

log = logging.getLogger("optiserve.server")

RunFn = Callable[[dict[str, np.ndarray], list[str] | None], dict[str, np.ndarray]]
# A request that finds the queue empty and an instance idle runs on the event loop itself when
# the model's recent batches computed faster than this: for a model that answers in
# microseconds, handing the request to a thread and the answer back costs more than the work,
# and batching has next to nothing to save. Not with a queue delay: that asks for batches.
INLINE_BELOW_S = 100e-6


class QueueFull(OptiserveError):
    """The model's queue is at its bound; `retry_after_s` says when to try again."""

    def __init__(self, model: str, size: int):
        super().__init__(f"Model '{model}' has {size} requests queued, its limit.",
                         hint="Retry after a moment, or deploy it with more instances or a "
                         "larger max_queue_size.")
        self.retry_after_s = 1


class RequestTimeout(OptiserveError):
    """A request that waited in the queue past its timeout."""

    def __init__(self, model: str, waited_s: float):
        super().__init__(f"The request for '{model}' waited {waited_s * 1000:.0f} ms in the "
                         "queue and reached its timeout before it ran.",
                         hint="Raise the deployment's timeout_ms (or the request's 'timeout' "
                         "parameter, in microseconds), or add instances.")


class ModelUnavailable(OptiserveError):
    """The model is not serving now (loading, its load failed, or being unloaded)."""


class ModelFailed(OptiserveError):
    """The runtime raised while running a batch (not the caller's input: that is checked
    before queueing)."""


@dataclass(eq=False)
class Pending:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float | None
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Timer:
    loop: asyncio.AbstractEventLoop
    handle: asyncio.TimerHandle

    def cancel(self) -> None:
        self.handle.cancel()


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch reports to the metrics."""

    rows: int
    requests: int
    queue_s: list[float]
    compute_s: float


class Batcher:
    def __init__(self, name: str, runners: list[RunFn], *, max_batch_size: int,
                 max_queue_delay_us: int = 0, preferred_batch_sizes: list[int] | None = None,
                 max_queue_size: int = 1024, timeout_s: float | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 inline_below_s: float = INLINE_BELOW_S):
        self.name = name
        self.inline_below_s = inline_below_s
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self.preferred = sorted(set(preferred_batch_sizes or []))
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._runners = runners
        self._busy = [threading.Lock() for _ in runners]  # held while an instance computes
        self._compute_s: float | None = None  # moving average of a batch's compute time
        self._sweep_at: tuple[float, _Timer | None] = (0.0, None)
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                          name=f"optiserve-{name}-{i}")
                         for i in range(len(runners))]
        for t in self._threads:
            t.start()

    # -- the request side (event loop) --------------------------------------------------------
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
               timeout_s: float | None = None) -> asyncio.Future:
        """Queue one request; its future resolves to the outputs for its own rows."""
        loop = asyncio.get_running_loop()
        first = next(iter(inputs.values()))
        rows = first.shape[0] if self.max_batch_size and first.ndim else 1
        if self.max_batch_size and rows > self.max_batch_size:
            from optiserve.server.tensors import TensorError
            raise TensorError(f"The request carries a batch of {rows} rows; model "
                              f"'{self.name}' takes at most {self.max_batch_size} at once.",
                              hint="Split it into smaller requests.")
        key = (tuple(outputs) if outputs else None,
               tuple((n, a.shape[1:], a.dtype.str) for n, a in inputs.items()))
        now = time.perf_counter()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        item = Pending(inputs, outputs, rows, key, loop.create_future(), loop, now,
                       now + timeout if timeout else None)
        if self._inline(item):
            return item.future
        with self._cond:
            if self._closed:
                raise ModelUnavailable(f"Model '{self.name}' is being unloaded.",
                                       hint="Retry; the newer version takes requests.")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(self.name, len(self._queue))
            self._queue.append(item)
            self._cond.notify()
        if timeout:  # fail at the deadline even while every instance is busy
            self._arm(loop, item.deadline)
        return item.future

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """One sweep timer per batcher, at the earliest deadline queued (a timer per request
        would fill the loop's heap with cancelled handles at thousands of requests/s)."""
        when, handle = self._sweep_at
        if handle is not None and when <= deadline and handle.loop is loop:
            return
        if handle is not None:
            handle.cancel()
        delay = max(0.0, deadline - time.perf_counter())
        self._sweep_at = (deadline, _Timer(loop, loop.call_later(delay, self._sweep, loop)))

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: fail the queued requests past their deadline, re-arm."""
        now = time.perf_counter()
        with self._cond:
            late = [p for p in self._queue if p.deadline is not None and p.deadline <= now]
            for p in late:
                self._queue.remove(p)
            nxt = min((p.deadline for p in self._queue
                       if p.deadline is not None and p.loop is loop), default=None)
        self._sweep_at = (0.0, None)
        if nxt is not None:
            self._arm(loop, nxt)
        _resolve([(p, RequestTimeout(self.name, now - p.enqueued)) for p in late])

    def _inline(self, item: Pending) -> bool:
        """Run `item` here, on the event loop, if nothing is queued, an instance is idle and
        the model is fast enough (`inline_below_s`); False to queue it instead."""
        if self._queue or self._closed or self.delay_s or self._compute_s is None or \
                self._compute_s > self.inline_below_s:
            return False
        for run, busy in zip(self._runners, self._busy):
            if busy.acquire(blocking=False):
                try:
                    parts = self._run(run, [item])
                finally:
                    busy.release()
                _deliver(parts, inline=True)
                return True
        return False

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; finish (or with drain=False fail) what is queued; join."""
        with self._cond:
            self._closed = True
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
                _fail(dropped, ModelUnavailable(f"Model '{self.name}' was unloaded."))
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=60)

    # -- the instance side (threads) ----------------------------------------------------------
    def _work(self, i: int) -> None:
        run, busy = self._runners[i], self._busy[i]
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
            with busy:
                parts = self._run(run, batch)
            # Answered only once the instance is idle again: a client that sends its next
            # request on the answer finds it free (and a fast model then runs inline).
            _deliver(parts)

    def _next_batch(self) -> list[Pending] | None:
        """Under the lock: wait for work and cut a batch; None when closed and drained."""
        while True:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            self._expire()
            if not self._queue:
                continue
            batch, rows = self._collect()
            if self.delay_s and rows < self.max_batch_size and \
                    rows not in self.preferred and not self._closed:
                left = self._queue[0].enqueued + self.delay_s - time.perf_counter()
                if left > 0:
                    self._cond.wait(left)
                    continue
            for item in batch:
                self._queue.remove(item)
            return batch

    def _collect(self) -> tuple[list[Pending], int]:
        """The head request and the queued ones that can share its batch, in order."""
        head = self._queue[0]
        if not self.max_batch_size:
            return [head], head.rows
        batch, rows, cuts = [], 0, []
        for item in self._queue:
            if item.key != head.key:
                continue
            if rows + item.rows > self.max_batch_size:
                break
            batch.append(item)
            rows += item.rows
            if rows in self.preferred:
                cuts.append((len(batch), rows))
        if self.preferred and cuts and rows not in self.preferred:
            n, rows = cuts[-1]
            batch = batch[:n]
        return batch, rows

    def _expire(self) -> None:
        now = time.perf_counter()
        late = [p for p in self._queue if p.deadline is not None and p.deadline < now]
        for p in late:
            self._queue.remove(p)
            _fail([p], RequestTimeout(self.name, now - p.enqueued))

    def _run(self, run: RunFn, batch: list[Pending]) -> list[tuple[Pending, object]]:
        """Run one batch; each request's answer (its outputs, or the error) for _deliver."""
        start = time.perf_counter()
        rows = sum(p.rows for p in batch)
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {n: np.concatenate([p.inputs[n] for p in batch])
                          for n in batch[0].inputs}
            result = run(inputs, batch[0].outputs)
            if len(batch) > 1:
                bad = [n for n, a in result.items() if not a.ndim or a.shape[0] != rows]
                if bad:
                    raise ModelFailed(f"Output '{bad[0]}' of model '{self.name}' is not one row "
                                      "per input row, so a batch cannot be split.",
                                      hint="Deploy it with max_batch_size 0.")
        except Exception as exc:  # the runtime's own failure: every request in it learns why
            if not isinstance(exc, OptiserveError):
                log.exception("model %s failed on a batch of %d", self.name, len(batch))
                exc = ModelFailed(f"Model '{self.name}' failed: {first_line(exc)}.")
            return [(p, exc) for p in batch]
        end = time.perf_counter()
        c = self._compute_s
        self._compute_s = end - start if c is None else 0.8 * c + 0.2 * (end - start)
        parts, offset = [], 0
        for p in batch:
            if len(batch) == 1:
                parts.append((p, result))
            else:
                parts.append((p, {n: a[offset:offset + p.rows] for n, a in result.items()}))
            offset += p.rows
            p.timings.update(queue_s=start - p.enqueued, compute_s=end - start, batch_rows=rows)
        if self.on_batch:  # before the answers: a client that then reads stats sees its batch
            try:
                self.on_batch(BatchStats(rows, len(batch), [start - p.enqueued for p in batch],
                                         end - start))
            except Exception:  # counting must never keep an answer from its request
                log.exception("model %s: recording a batch failed", self.name)
        return parts


def _deliver(parts: list[tuple[Pending, object]], inline: bool = False) -> None:
    """Resolve futures with one wake-up per event loop, not one per request (`inline`: we
    are on the requests' own loop, so resolve them now)."""
    if inline:
        _resolve(parts)
        return
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for p, value in parts:
        by_loop.setdefault(p.loop, []).append((p, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # that loop is closed: its clients are gone
            pass


def _fail(batch: list[Pending], exc: BaseException) -> None:
    _deliver([(p, exc) for p in batch])


def _resolve(items: list) -> None:
    for p, value in items:
        future = p.future
        if future.done():
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
