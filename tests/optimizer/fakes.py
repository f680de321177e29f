"""Plain-subclass fakes of the Optimizer: real passes and measurements, pinned numbers on top."""

from __future__ import annotations

from optiserve.bench.latency import Latency
from optiserve.optimizer.pipeline import Optimizer


class PinnedOptimizer(Optimizer):
    """Measures every candidate for real, then pins its p50 (ms per batch size) and, optionally,
    its metric, by candidate label. Makes the choice between candidates deterministic."""

    def __init__(self, *args, latencies: dict[str, dict[int, float]] | None = None,
                 metric: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.latencies, self.metric = latencies or {}, metric or {}
        self.measured: list[str] = []

    def _time(self, artifact, dataset, outputs):
        latency, peak = super()._time(artifact, dataset, outputs)
        if artifact.label in self.latencies:
            latency = {bs: Latency(bs, 1, ms, ms, ms, ms, bs / ms * 1000)
                       for bs, ms in self.latencies[artifact.label].items()}
        return latency, peak

    def measure(self, artifact, dataset, reference, task):
        cand = super().measure(artifact, dataset, reference, task)
        self.measured.append(artifact.label)
        if artifact.label in self.metric:
            cand.evaluation.value = self.metric[artifact.label]
        return cand
