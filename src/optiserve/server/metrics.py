"""Prometheus metrics of the inference server (`GET /metrics`), and the per-version counters
behind the protocol's statistics extension (`/v2/models/{m}/stats`).

Label values are bounded: model and version are the served ones (a request for an unknown
model counts under model="_unknown"), outcome and phase come from fixed lists. Nothing is
labelled per request.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

UNKNOWN = "_unknown"
OUTCOMES = ("success", "bad_request", "not_found", "rejected", "timeout", "unavailable",
            "error")
_LATENCY = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def outcome(status: int) -> str:
    """The outcome label of an HTTP status (gRPC codes are mapped to these statuses first)."""
    return {200: "success", 404: "not_found", 429: "rejected", 504: "timeout",
            503: "unavailable"}.get(status, "bad_request" if 400 <= status < 500 else "error")


class Metrics:
    """One Prometheus registry per server app, so several apps in one process do not clash."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("optiserve_requests", "Inference requests by outcome.",
                                ["model", "version", "protocol", "outcome"], registry=r)
        self.latency = Histogram("optiserve_request_duration_seconds",
                                 "Inference latency: time queued, computing (the whole batch "
                                 "it ran in), and in total inside the server.",
                                 ["model", "version", "phase"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("optiserve_batch_size", "Rows per executed batch.",
                                    ["model", "version"], buckets=_BATCH, registry=r)
        self.inferences = Counter("optiserve_inference_count", "Rows inferred (a request "
                                  "of 8 rows counts 8).", ["model", "version"], registry=r)
        self.executions = Counter("optiserve_execution_count", "Model executions (batches); "
                                  "inference_count / execution_count = mean batch size.",
                                  ["model", "version"], registry=r)
        self.queue_depth = Gauge("optiserve_queue_depth", "Requests waiting to run.",
                                 ["model", "version"], registry=r)
        self.loaded = Gauge("optiserve_loaded_versions", "Model versions loaded and ready.",
                            registry=r)
        self.loads = Counter("optiserve_model_loads", "Load attempts by outcome.",
                             ["model", "outcome"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class VersionStats:
    """Counters of one served version, in the shape of Triton's statistics extension:
    successes and failures with their total time, queue and compute time, per batch size."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._lock = threading.Lock()
        self.model, self.version = model, version
        self.success = [0, 0]  # count, ns
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute = [0, 0]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.by_batch: dict[int, list[int]] = {}
        m = metrics
        self._queue_h = m.latency.labels(model, version, "queue")
        self._compute_h = m.latency.labels(model, version, "compute")
        self._total_h = m.latency.labels(model, version, "total")
        self._batch_h = m.batch_size.labels(model, version)
        self._inferences = m.inferences.labels(model, version)
        self._executions = m.executions.labels(model, version)
        self._requests = {}
        self._metrics = m

    def batch(self, rows: int, requests: int, queue_s: list[float], compute_s: float) -> None:
        """One executed batch (called from the instance thread)."""
        ns = int(compute_s * 1e9)
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.compute[0] += requests
            self.compute[1] += ns * requests
            for q in queue_s:
                self.queue[0] += 1
                self.queue[1] += int(q * 1e9)
            b = self.by_batch.setdefault(rows, [0, 0])
            b[0] += 1
            b[1] += ns
        self._batch_h.observe(rows)
        self._inferences.inc(rows)
        self._executions.inc()
        self._compute_h.observe(compute_s)
        for q in queue_s:
            self._queue_h.observe(q)

    def request(self, protocol: str, status: int, total_s: float) -> None:
        """One finished request (called on the event loop by the face that answered it)."""
        key = (protocol, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(
                self.model, self.version, protocol, outcome(status))
        child.inc()
        ns = int(total_s * 1e9)
        with self._lock:
            bucket = self.success if status == 200 else self.fail
            bucket[0] += 1
            bucket[1] += ns
        if status == 200:
            self._total_h.observe(total_s)

    def forget(self) -> None:
        """Remove this version's series once it is unloaded, so reloads do not pile up
        label sets."""
        m = self._metrics
        series = [(m.latency, (self.model, self.version, phase))
                  for phase in ("queue", "compute", "total")]
        series += [(metric, (self.model, self.version)) for metric in
                   (m.batch_size, m.inferences, m.executions, m.queue_depth)]
        series += [(m.requests, (self.model, self.version, protocol, outcome(status)))
                   for protocol, status in self._requests]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:
                pass

    def as_json(self) -> dict:
        """The model_stats entry of the statistics extension."""
        def d(pair: list[int]) -> dict:
            return {"count": pair[0], "ns": pair[1]}

        with self._lock:
            return {
                "name": self.model, "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": d(self.success), "fail": d(self.fail), "queue": d(self.queue),
                    "compute_input": d([self.compute[0], 0]),
                    "compute_infer": d(self.compute), "compute_output": d([self.compute[0], 0]),
                    "cache_hit": d([0, 0]), "cache_miss": d([0, 0])},
                "batch_stats": [{"batch_size": size, "compute_input": d([c, 0]),
                                 "compute_infer": d([c, ns]), "compute_output": d([c, 0])}
                                for size, (c, ns) in sorted(self.by_batch.items())],
            }
