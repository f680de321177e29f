"""The report: the seed's response shape, and the details behind it (every candidate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optiserve.bench.latency import Latency
from optiserve.data.metrics import Evaluation, GateResult
from optiserve.passes.base import Artifact
from optiserve.registry.registry import VersionInfo


@dataclass
class Candidate:
    artifact: Artifact
    runtime: str
    latency: dict[int, Latency]
    evaluation: Evaluation
    outputs: dict
    size_bytes: int
    parity: dict[str, Any]
    peak_rss_mb: float = 0.0
    gate: GateResult | None = None
    version: VersionInfo | None = None
    #: batch size -> |p50 of run 1 - p50 of run 2| / the smaller, for a candidate timed twice
    run_spread: dict[int, float] = field(default_factory=dict)

    def summary(self, batch_size: int) -> dict[str, Any]:
        return {
            "format": self.artifact.format,
            "size_mb": round(self.size_bytes / 1e6, 3),
            "latency_ms": round(self.latency[batch_size].p50_ms, 4),
            "accuracy": round(self.evaluation.value, 4),
        }

    def details(self) -> dict[str, Any]:
        return {
            "label": self.artifact.label, "passes": self.artifact.passes,
            "runtime": self.runtime, "size_mb": round(self.size_bytes / 1e6, 3),
            "peak_rss_mb": self.peak_rss_mb,
            "metric": self.evaluation.metric, "value": self.evaluation.value,
            "n": self.evaluation.n, "metric_details": self.evaluation.details,
            "parity": self.parity, "notes": self.artifact.notes,
            # parameters / non-zero parameters / MACs per row, [before, after] the pass that
            # shrank the network (training passes), carried to the candidates made from it
            "model_stats": self.artifact.meta.get("model_stats"),
            "latency": {f"batch_{bs}": lat.as_dict() for bs, lat in self.latency.items()},
            # timed twice: how far the two runs' p50 differed, relative (see pipeline.noise)
            "run_spread": {f"batch_{bs}": round(v, 4) for bs, v in self.run_spread.items()},
            "gate": None if self.gate is None else {
                "passed": self.gate.passed, "ratio": round(self.gate.ratio, 5),
                "required": round(self.gate.required, 5), "reason": self.gate.reason},
        }


def _pct(before: float, after: float) -> str:
    return f"{(1 - after / before) * 100:.1f}%" if before else "n/a"


@dataclass
class OptimizationResult:
    """What `optimize()` returns: `response` is exactly the seed's response body."""

    response: dict[str, Any]
    run_id: str
    status: str
    original: Candidate
    candidates: list[Candidate]
    chosen: Candidate
    threshold: float
    batch_size: int
    dataset: str
    threads: int
    notes: list[str] = field(default_factory=list)
    #: the version to use at each batch size: the fastest passing candidate there when it
    #: beats the chosen one by more than the timing noise (then registered too), else the chosen
    fastest: dict[int, Candidate] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    pareto_png: str | None = None

    @property
    def version(self) -> VersionInfo | None:
        return self.chosen.version

    def details(self) -> dict[str, Any]:
        return {
            **self.response,
            "details": {
                "threshold": self.threshold, "batch_size": self.batch_size,
                "threads": self.threads, "dataset": self.dataset,
                "metric": self.original.evaluation.metric,
                "original": self.original.details(),
                "candidates": [c.details() for c in self.candidates],
                "chosen": self.candidates.index(self.chosen),
                "version": None if self.version is None else self.version.version,
                "fastest_by_batch_size": {
                    str(bs): {"candidate": self.candidates.index(c), "label": c.artifact.label,
                              "p50_ms": c.latency[bs].p50_ms,
                              "version": c.version.version if c.version else None}
                    for bs, c in self.fastest.items()},
                "hardware": self.hardware,
                "pareto_png": self.pareto_png,
                "notes": self.notes,
            },
        }

    def failure_reason(self) -> str:
        c = self.chosen
        return (f"No candidate kept {self.threshold:.2%} of the original "
                f"{c.evaluation.metric}. Closest: {c.artifact.label}: {c.gate.reason}. "
                f"It is kept as rejected version {c.version.version if c.version else '?'}; "
                "lower the threshold or try other passes.")


def build_report(*, run_id: str, status: str, source: VersionInfo, original: Candidate,
                 candidates: list[Candidate], chosen: Candidate, threshold: float,
                 batch_size: int, notes: list[str], dataset: str, threads: int,
                 fastest: dict[int, Candidate] | None = None,
                 hardware: dict[str, Any] | None = None) -> OptimizationResult:
    before, after = original.summary(batch_size), chosen.summary(batch_size)
    change = after["accuracy"] - before["accuracy"]
    response = {
        "optimization_id": run_id,
        "status": status,
        "original": before,
        "optimized": after,
        "improvement": {
            "size_reduction": _pct(original.size_bytes, chosen.size_bytes),
            "latency_reduction": _pct(original.latency[batch_size].p50_ms,
                                      chosen.latency[batch_size].p50_ms),
            "accuracy_change": f"{change:+.3f}" if round(change, 3) else "0.000",
        },
        "artifact_id": chosen.version.artifact_id if chosen.version else None,
    }
    return OptimizationResult(response=response, run_id=run_id, status=status,
                              original=original, candidates=candidates, chosen=chosen,
                              threshold=threshold, batch_size=batch_size, dataset=dataset,
                              threads=threads, notes=notes, fastest=fastest or {},
                              hardware=hardware or {})
