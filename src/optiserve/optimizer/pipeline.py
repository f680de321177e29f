"""The optimizer: build candidates from the requested passes, gate each on accuracy, benchmark
each, keep the fastest that passes, register it, and report.

Every node of the candidate tree is a candidate, prefixes included: when INT8 is slower than
FP32 on this machine, the FP32 ONNX model wins and the report says why. When no candidate
passes, the closest one is kept as a rejected version and GateFailedError carries the report.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.bench.isolated import benchmark_isolated
from optiserve.bench.latency import Latency
from optiserve.convert.formats import FRAMEWORKS
from optiserve.core.errors import (ConfigError, DatasetError, GateFailedError, OptimizationTimeout,
                                   OptiserveError, first_line)
from optiserve.core.hardware import detect
from optiserve.core.settings import Settings
from optiserve.data import metrics
from optiserve.data.binding import Dataset
from optiserve.data.sources import load
from optiserve.optimizer.report import Candidate, OptimizationResult, build_report
from optiserve.optimizer.request import OptimizeRequest
from optiserve.optimizer import pareto, search
from optiserve.optimizer.search import expand
from optiserve.optimizer.tree import CandidateTree
from optiserve.passes.base import Artifact, PassContext, get_pass
from optiserve.registry.registry import Registry, VersionInfo
from optiserve.runtimes.base import load_runtime

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
_SYNTHETIC_ROWS = 64


def load_dataset(request: OptimizeRequest, version: VersionInfo, settings: Settings) -> Dataset:
    spec = request.validation_dataset
    if spec is None:
        inputs = version.signature.example_inputs(_SYNTHETIC_ROWS)
        return Dataset(inputs, None, f"{_SYNTHETIC_ROWS} synthetic rows (no validation data)")
    return load(spec, version.signature, settings,
                feature_names=version.meta.get("feature_names"),
                default_label=version.meta.get("label_column"))


class Optimizer:
    """One optimization run. Use `optimize()`; this class holds the run's state."""

    def __init__(self, registry: Registry, request: OptimizeRequest,
                 progress: Progress | None = None, *, run_id: str | None = None,
                 on_candidate: Callable[[Candidate], None] | None = None,
                 training: Any = None,
                 status_of: Callable[[BaseException], int] | None = None):
        """`run_id`: an existing run (a server job) to report into instead of a new one;
        `on_candidate` is called with each candidate once it is measured and gated;
        `training`: training rows given in Python (a DataLoader or iterable of batches, see
        data/batches.py) instead of the request's training_dataset; `status_of`: the HTTP
        status a failed run's row records (the server's job worker passes its error table's;
        without it the row records none)."""
        self.registry, self.request, self.run_id = registry, request, run_id
        self.status_of = status_of or (lambda exc: None)
        self.on_candidate = on_candidate or (lambda cand: None)
        self.settings = registry.settings
        self.progress = progress or (lambda msg, frac: None)
        self.threshold = request.accuracy_threshold or self.settings.optimization_accuracy_threshold
        self.deadline = time.monotonic() + 60 * self.settings.optimization_max_time_minutes
        self.notes: list[str] = []
        self.timed_out = False
        self.plans: dict[str, list] = {}
        self.training: Dataset | None = None
        self.training_batches = training
        self.hardware = detect()

    # -- one candidate ------------------------------------------------------------------
    def measure(self, artifact: Artifact, dataset: Dataset, reference, task) -> Candidate:
        runtime = load_runtime(artifact.path, artifact.signature, format=artifact.format,
                               threads=self.settings.threads)
        with runtime:
            outputs = metrics.collect(runtime, dataset)
            reference = reference if reference is not None else outputs
            task = task or metrics.detect_task(outputs, dataset.labels)
            evaluation = metrics.evaluate(outputs, dataset.labels, reference, task)
        latency, peak_mb = self._time(artifact, dataset, _primary_output(outputs, task))
        return Candidate(artifact=artifact, runtime=runtime.name, latency=latency,
                         evaluation=evaluation, outputs=outputs,
                         size_bytes=artifact.path.stat().st_size, peak_rss_mb=peak_mb,
                         parity=_parity(outputs, reference, task))

    def _time(self, artifact: Artifact, dataset: Dataset, outputs: list[str] | None):
        """Latency per batch size and peak memory, timed alone in a fresh process."""
        return benchmark_isolated(
            artifact.path, artifact.signature, format=artifact.format,
            threads=self.settings.threads,
            inputs={bs: dataset.take(bs) for bs in self.request.batch_sizes},
            warmup=self.request.warmup, iterations=self.request.iterations, max_seconds=10,
            outputs=outputs)

    # -- the tree of candidates ---------------------------------------------------------
    def chain(self, original: Artifact) -> list[str]:
        names = search.chain(self.request.optimizations)
        if "auto" in self.request.optimizations:
            names = self._auto(names)
        classes = [get_pass(n) for n in names]
        if names and classes[0].refuses(original.format) and "onnx" in (classes[0].formats or ()) \
                and "onnx_conversion" not in names:
            names.insert(0, "onnx_conversion")
            self.notes.append("added onnx_conversion first: the other passes work on ONNX")
        if {"quantization", "qat"} & set(names) and self.hardware.int8_note:
            self._note(f"preflight: {self.hardware.int8_note}")  # said before the work, not after
        return names

    def _auto(self, names: list[str]) -> list[str]:
        """"auto" leaves out what cannot pay off here, and says so."""
        left_out = []
        if not self.hardware.cuda:
            gpu = [n for n in ("fp16", "tensorrt") if n in names
                   and n not in self.request.optimizations]
            if gpu:
                left_out.append(f"{' and '.join(gpu)}: no GPU here ({self.hardware.summary()}); "
                                "they are GPU optimizations. Name them to measure them anyway")
            names = [n for n in names if n not in gpu]
        if self.training is None and "qat" in names and "qat" not in self.request.optimizations:
            left_out.append("qat: it trains, and the request has no training_dataset"
                            if self.request.training_dataset is None else
                            "qat: its training data cannot be used (see above)")
            names.remove("qat")
        for text in left_out:
            self._note(f"auto left out {text}")
        return names

    def tree(self, original: Artifact, dataset: Dataset, calibration: Dataset | None,
             workdir: Path, measure: Callable[[Artifact], Candidate | None]) -> CandidateTree:
        """The candidate tree of this request (optimizer/tree.py), measuring with `measure`."""
        configs = self.request.configs()
        names = self.chain(original)
        plans = {n: self.plans[n] if n in self.plans else expand(get_pass(n), configs.get(n))
                 for n in names}  # only an inserted onnx_conversion is new here
        unused = set(configs) - set(names)
        if unused:
            self.notes.append(f"options given for passes not requested: {sorted(unused)}")
        context = PassContext(workdir=workdir, settings=self.settings,
                              sample=dataset.take(min(2, dataset.n)), calibration=calibration,
                              training=self.training, hardware=self.hardware,
                              deadline=self.deadline,
                              batch_sizes=tuple(self.request.batch_sizes),
                              progress=self.progress)
        return CandidateTree(plans, configs, context, dataset.take(min(16, dataset.n)), measure,
                             out_of_time=self._out_of_time, note=self._note)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            if not self.timed_out:
                self.notes.append(f"stopped at OPTIMIZATION_MAX_TIME_MINUTES="
                                  f"{self.settings.optimization_max_time_minutes}; kept the best "
                                  "candidate measured so far")
            self.timed_out = True
        return self.timed_out

    # -- the run ------------------------------------------------------------------------
    def prepare(self) -> tuple[VersionInfo, Dataset, Dataset]:
        """Everything that can be wrong with the request, checked before any work: pass names
        and options (the plans are kept for the run), the model, the data and its fit."""
        configs = self.request.configs()
        self.plans = {n: expand(get_pass(n), configs.get(n))
                      for n in search.chain(self.request.optimizations)}
        version = self.registry.resolve(self.request.model_id)
        dataset = load_dataset(self.request, version, self.settings)
        self.training = self._training(version)
        return version, dataset, self._calibration(version, dataset)

    def planned(self) -> int:
        """About how many candidates the run will measure (for progress), once prepared."""
        return CandidateTree.planned(self.plans)

    def run(self) -> OptimizationResult:
        runs = self.registry.runs
        try:
            version, dataset, calibration = self.prepare()
        except OptiserveError as exc:
            if self.run_id:  # a job: its row must say why
                runs.finish(self.run_id, "failed", error=str(exc),
                            error_status=self.status_of(exc))
            raise
        run_id = self.run_id or runs.create(version.model, self.request.model_dump(mode="json"))
        try:
            result = self._run(run_id, version, dataset, calibration)
        except OptimizationTimeout as exc:
            runs.finish(run_id, "timeout", error=str(exc), error_status=self.status_of(exc))
            raise
        except OptiserveError as exc:
            runs.finish(run_id, "failed", error=str(exc), error_status=self.status_of(exc))
            raise
        except BaseException as exc:  # a bug or Ctrl-C: the run must not stay "running"
            runs.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}", error_status=500)
            raise
        runs.finish(run_id, result.status, report=result.details())
        if result.status == "rejected":
            raise GateFailedError(result.failure_reason(), result)
        return result

    def _run(self, run_id: str, version: VersionInfo, dataset: Dataset,
             calibration: Dataset) -> OptimizationResult:
        original_art = Artifact(path=self.registry.path(version), format=version.format,
                                signature=version.signature, meta=dict(version.meta))
        self.progress(f"measuring the original ({version.format}) on {dataset.n} rows", 0)
        original = self.measure(original_art, dataset, None, None)
        task = original.evaluation.task
        measured: list[Candidate] = []

        def verdict(artifact: Artifact) -> Candidate | None:
            """One candidate measured and gated (None: it could not be measured)."""
            self.progress(f"measuring {artifact.label}", 0)
            try:
                cand = self.measure(artifact, dataset, original.outputs, task)
            except Exception as exc:  # e.g. a graph the runtime refuses: only it is lost
                log.debug("measuring %s failed", artifact.label, exc_info=True)
                self._note(f"{artifact.label} could not be measured: {type(exc).__name__}: "
                           f"{first_line(exc)}; the run went on without it")
                return None
            cand.gate = metrics.gate(cand.evaluation, original.evaluation, self.threshold)
            self._explain_parity(cand, original)
            measured.append(cand)
            self.on_candidate(cand)
            self.progress(f"measured {artifact.label}", 1)
            return cand

        with tempfile.TemporaryDirectory(prefix="optiserve-") as tmp:
            self.tree(original_art, dataset, calibration, Path(tmp), verdict).walk(original_art)
            if not measured and self.timed_out:
                raise OptimizationTimeout(
                    f"OPTIMIZATION_MAX_TIME_MINUTES={self.settings.optimization_max_time_minutes}"
                    " ran out before any candidate was measured.",
                    hint="Raise the limit, or request fewer passes.")
            if not measured:
                raise OptiserveError(
                    "No candidate was produced: every requested pass was skipped or failed "
                    f"({'; '.join(self.notes) or 'nothing to do'}).",
                    hint="Request passes that apply to this model.")
            passing = [c for c in measured if c.gate.passed]
            bs = self.request.batch_sizes[0]
            self._remeasure_finalists(passing, original, dataset)
            fastest: dict[int, Candidate] = {}
            if passing:
                chosen = min(passing, key=lambda c: _speed_score(c, passing))
                # the time ran out: the best so far is kept, but the search was cut short
                status = "timeout" if self.timed_out else "completed"
                fastest = {size: min(passing, key=lambda c: c.latency[size].p50_ms)
                           for size in self.request.batch_sizes}
                within = [(size, cand) for size, cand in fastest.items()  # no winner there
                          if cand is not chosen and not _clearly_faster(cand, chosen, size)]
                for size, _ in within:
                    fastest[size] = chosen
                self._note(_why(chosen, measured, original, fastest))
                for size, cand in within:
                    self._note(_within_noise(cand, chosen, size))
            else:
                chosen = max(measured, key=lambda c: c.evaluation.value - c.gate.required)
                status = "rejected"
            # each batch size keeps its own winner; the chosen one is registered last, so it is
            # the model's latest version
            for cand in fastest.values():
                if cand is not chosen and cand.version is None:
                    cand.version = self._register(version, cand, status, original)
            chosen.version = self._register(version, chosen, status, original)
        result = build_report(run_id=run_id, status=status, source=version, original=original,
                              candidates=measured, chosen=chosen, threshold=self.threshold,
                              batch_size=bs, notes=self.notes, dataset=dataset.description,
                              threads=self.settings.threads, fastest=fastest,
                              hardware=self.hardware.as_dict())
        try:
            result.pareto_png = pareto.save(result, self.settings.home / "reports", self._note)
        except Exception as exc:  # a chart must not fail a run whose versions are registered
            self._note(f"no Pareto chart: {type(exc).__name__}: {first_line(exc)}")
        return result

    def _remeasure_finalists(self, passing: list[Candidate], original: Candidate,
                             dataset: Dataset) -> None:
        """Time the passing candidates within 25 % of the best once more, in turn, and keep each
        one's faster run: one noisy measurement must not decide the choice. The original is
        re-timed too, so the reported improvement compares best-of-two with best-of-two; so is
        the fastest at each batch size, which may become its own version. The difference
        between a candidate's two runs is kept as its `run_spread`: part of the noise an extra
        per-batch-size version must beat (see _clearly_faster)."""
        if len(passing) < 2:
            return
        best = min(_speed_score(c, passing) for c in passing)
        finalists = [c for c in passing if _speed_score(c, passing) <= 1.25 * best]
        for size in self.request.batch_sizes:
            quickest = min(passing, key=lambda c: c.latency[size].p50_ms)
            if quickest not in finalists:
                finalists.append(quickest)
        for cand in [original, *finalists]:
            self.progress(f"re-measuring {cand.artifact.label}", 0)
            again, _ = self._time(cand.artifact, dataset,
                                  _primary_output(cand.outputs, cand.evaluation.task))
            cand.run_spread = {bs: _spread(cand.latency[bs], again[bs]) for bs in cand.latency}
            cand.latency = {bs: min(cand.latency[bs], again[bs], key=lambda r: r.p50_ms)
                            for bs in cand.latency}

    def _calibration(self, version: VersionInfo, dataset: Dataset) -> Dataset | None:
        spec = self.request.calibration_dataset
        if spec is None:
            return dataset  # passes that calibrate say so in their notes
        return self._extra_rows(spec, version, "calibration")

    def _training(self, version: VersionInfo) -> Dataset | None:
        if self.training_batches is not None:
            from optiserve.data.batches import from_batches

            if self.request.training_dataset is not None:
                raise ConfigError("Both training_dataset and Python training batches were "
                                  "given.", hint="Give one of them.")
            return from_batches(self.training_batches, version.signature)
        spec = self.request.training_dataset
        return None if spec is None else self._extra_rows(spec, version, "training")

    def _extra_rows(self, spec, version: VersionInfo, role: str) -> Dataset | None:
        """Calibration or training rows. Unusable ones cost only the passes that need them:
        the run goes on with the others, and the report says why they were skipped."""
        try:
            rows = load(spec, version.signature, self.settings,
                        feature_names=version.meta.get("feature_names"), role=role,
                        default_label=version.meta.get("label_column"))
        except DatasetError as exc:
            self._note(f"the {role} data cannot be used: {exc}; passes that need it are skipped")
            return None
        if rows.n == 0:
            self._note(f"the {role} data has no rows; passes that need it are skipped")
            return None
        return rows

    def _explain_parity(self, cand: Candidate, original: Candidate) -> None:
        differing = cand.parity.get("labels_differing", 0)
        if differing and FRAMEWORKS[original.artifact.format] == "sklearn" \
                and cand.artifact.format == "onnx":
            self._note(f"{differing} of {cand.evaluation.n} labels of {cand.artifact.label} differ "
                       "from scikit-learn's: ONNX tree and linear operators compare features "
                       "in float32 where scikit-learn uses float64, so rows near a split "
                       "threshold can change side. The gate above measures the effect.")

    def _register(self, parent: VersionInfo, cand: Candidate, status: str,
                  original: Candidate) -> VersionInfo:
        bs = self.request.batch_sizes[0]
        metrics_row = {
            cand.evaluation.metric: cand.evaluation.value, "n": cand.evaluation.n,
            "original_" + cand.evaluation.metric: original.evaluation.value,
            f"p50_ms_batch_{bs}": cand.latency[bs].p50_ms, "gate": cand.gate.reason,
        }
        return self.registry.add_version(
            parent.model, cand.artifact.path, framework=FRAMEWORKS[cand.artifact.format],
            format=cand.artifact.format,
            signature=cand.artifact.signature, parent=parent.version,
            passes=cand.artifact.passes, metrics=metrics_row,
            meta={k: v for k, v in cand.artifact.meta.items() if k != "opsets"},
            status="rejected" if status == "rejected" else "ready")


def _why(chosen: Candidate, measured: list[Candidate], original: Candidate,
         fastest: dict[int, Candidate]) -> str:
    """Why the chosen candidate won, in numbers; and what the faster-looking kinds measured."""
    sizes = list(chosen.latency)
    text = (f"chosen: {chosen.artifact.label} ({chosen.runtime}), p50 "
            + ", ".join(f"{chosen.latency[b].p50_ms:.3f} ms at batch {b}" for b in sizes)
            + "; the original: " + ", ".join(f"{original.latency[b].p50_ms:.3f} ms"
                                              for b in sizes))
    # the other precision's best, for contrast: the choice between FP32 and INT8 is measured
    mine = _precision(chosen)
    other = [c for c in measured if c is not chosen and c.gate.passed
             and (_precision(c) == "INT8") != (mine == "INT8")]
    if other:
        best = min(other, key=lambda c: _speed_score(c, [chosen, c]))
        took = ", ".join(f"{best.latency[b].p50_ms:.3f} ms" for b in sizes)
        text += (f". INT8 does not pay off here: the fastest passing INT8 candidate, "
                 f"{best.artifact.label}, took {took}" if mine != "INT8" else
                 f". INT8 pays off here: the fastest passing {_precision(best)} candidate, "
                 f"{best.artifact.label}, took {took}")
    beaten = [b for b in sizes if original.latency[b].p50_ms < chosen.latency[b].p50_ms]
    if beaten:  # never claim a speedup the measurement does not show
        text += (f". The original ({original.runtime}) is faster at batch "
                 + ", ".join(f"{b} ({original.latency[b].p50_ms:.3f} vs "
                             f"{chosen.latency[b].p50_ms:.3f} ms)" for b in beaten)
                 + ": no candidate beats it there")
    others = {b: c for b, c in fastest.items() if c is not chosen}
    for b, c in others.items():
        gap, limit = _lead(c, chosen, b)
        text += (f". At batch {b} {c.artifact.label} is faster ({c.latency[b].p50_ms:.3f} ms, "
                 f"{gap:.1%}, beyond the {limit:.1%} timing noise) "
                 "and is kept as its own version")
    return text


# -- timing noise ------------------------------------------------------------------------
def _spread(a: Latency, b: Latency) -> float:
    """How far two timed runs of the same artifact disagree: |p50₁ - p50₂| / the smaller."""
    low = min(a.p50_ms, b.p50_ms)
    return abs(a.p50_ms - b.p50_ms) / low if low > 0 else 0.0


def _p50_error(lat: Latency) -> float:
    """The relative standard error of one run's p50: a median of n calls varies by about
    1.2533 σ / √n, with σ read off the run's own spread above its median as (p95 - p50) / 1.645
    (what it is for a normal distribution; latency has a longer tail, so this errs high)."""
    if lat.runs < 2 or lat.p50_ms <= 0:
        return 0.0
    sigma = max(lat.p95_ms - lat.p50_ms, 0.0) / 1.645
    return 1.2533 * sigma / np.sqrt(lat.runs) / lat.p50_ms


def noise(cand: Candidate, size: int) -> float:
    """The timing noise of a candidate's p50 at one batch size, relative to it: the larger of
    the difference between its two timed runs (when it was timed twice) and its p50's standard
    error within the run kept."""
    return max(cand.run_spread.get(size, 0.0), _p50_error(cand.latency[size]))


def _lead(cand: Candidate, chosen: Candidate, size: int) -> tuple[float, float]:
    """How much faster `cand` is than `chosen` at `size` (relative), and the noise it must
    beat: the larger of the two measurements' noise."""
    gap = chosen.latency[size].p50_ms / cand.latency[size].p50_ms - 1
    return gap, max(noise(cand, size), noise(chosen, size))


def _clearly_faster(cand: Candidate, chosen: Candidate, size: int) -> bool:
    """Whether `cand` beats `chosen` at `size` by more than the noise of either measurement:
    only then is it worth a version of its own."""
    gap, limit = _lead(cand, chosen, size)
    return gap > limit


def _within_noise(cand: Candidate, chosen: Candidate, size: int) -> str:
    gap, limit = _lead(cand, chosen, size)
    return (f"at batch {size} {cand.artifact.label} measured {cand.latency[size].p50_ms:.4f} ms "
            f"against the chosen one's {chosen.latency[size].p50_ms:.4f} ms: {gap:.1%} faster, "
            f"within the timing noise ({limit:.1%}: the larger, over the two, of "
            "the difference between a candidate's two timed runs and its p50's standard error), "
            "so no extra version is kept for that batch size")


def _precision(cand: Candidate) -> str:
    """INT8, FP16 or FP32: the precision the passes that made the candidate recorded."""
    return str(cand.artifact.meta.get("precision", "fp32")).upper()


def _speed_score(cand: Candidate, pool: list[Candidate]) -> float:
    """Geometric mean over batch sizes of p50 / the best p50 at that size (1.0 = fastest at
    every size). With one batch size this is plain p50 order."""
    ratios = [cand.latency[bs].p50_ms / min(c.latency[bs].p50_ms for c in pool)
              for bs in cand.latency]
    return float(np.exp(np.mean(np.log(ratios))))


def _primary_output(outputs: dict, task: str) -> list[str] | None:
    """Time what the user's `predict` returns: labels for classifiers that have them."""
    if task == "classification" and "label" in outputs:
        return ["label"]
    return None


def _parity(outputs: dict, reference: dict, task: str) -> dict:
    """Max abs / relative error of the main output and label agreement vs the original."""
    key = next((k for k in ("probabilities", "variable") if k in outputs and k in reference),
               None)
    a = outputs[key] if key else next(iter(outputs.values()))
    b = reference[key] if key else next(iter(reference.values()))
    out: dict = {}
    if a.dtype.kind in "fiu" and b.dtype.kind in "fiu" and a.size == b.size:
        a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        diff = np.abs(a64 - b64)
        out["max_abs"] = float(diff.max())
        out["max_rel"] = float((diff / np.maximum(np.abs(b64), 1e-6)).max())
    if task == "classification":
        same = metrics._same(metrics.predictions(outputs, task),
                             metrics.predictions(reference, task))
        out["label_agreement"] = float(same.mean())
        out["labels_differing"] = int((~same).sum())
    return out


def optimize(registry: Registry, request: OptimizeRequest,
             progress: Progress | None = None, *, training: Any = None) -> OptimizationResult:
    return Optimizer(registry, request, progress, training=training).run()
