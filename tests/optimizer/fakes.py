"""Plain-subclass fakes of the Optimizer: real passes and measurements, pinned numbers on top."""

from __future__ import annotations

from optiserve.bench.latency import Latency
from optiserve.optimizer.pipeline import Optimizer


class PinnedOptimizer(Optimizer):
    """Measures every candidate for real, then pins its p50 (ms per batch size) and, optionally,
    its metric, by candidate label. Makes the choice between candidates deterministic.

    A pinned p50 is one number for every timed run, or a list: the first run's, the second's
    (a finalist is timed twice), ... the last repeated."""

    def __init__(self, *args, latencies: dict[str, dict[int, float | list[float]]] | None = None,
                 metric: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.latencies, self.metric = latencies or {}, metric or {}
        self.measured: list[str] = []
        self.timed: dict[str, int] = {}

    def _time(self, artifact, dataset, outputs):
        latency, peak = super()._time(artifact, dataset, outputs)
        if artifact.label in self.latencies:
            run = self.timed.get(artifact.label, 0)
            self.timed[artifact.label] = run + 1
            latency = {}
            for bs, pinned in self.latencies[artifact.label].items():
                ms = pinned[min(run, len(pinned) - 1)] if isinstance(pinned, list) else pinned
                latency[bs] = Latency(bs, 1, ms, ms, ms, ms, bs / ms * 1000)
        return latency, peak

    def measure(self, artifact, dataset, reference, task):
        cand = super().measure(artifact, dataset, reference, task)
        self.measured.append(artifact.label)
        if artifact.label in self.metric:
            cand.evaluation.value = self.metric[artifact.label]
        return cand
