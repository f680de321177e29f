"""Metrics and the gate.

Task is detected from the data: labels + a label/score output -> classification (accuracy);
labels + a numeric output -> regression (R², MAE); no labels -> similarity with the original
model's outputs (mean cosine; embeddings). Every metric is compared with the original's on the
same rows, and the gate keeps a candidate only if its metric >= threshold x the original's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optiserve.core.errors import DatasetError

Outputs = dict[str, np.ndarray]


def collect(runtime, dataset, batch_size: int = 64) -> Outputs:
    """Run a runtime over the whole dataset in batches and join the outputs."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in dataset.batches(batch_size):
        for name, value in runtime.predict(batch).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


def detect_task(outputs: Outputs, labels: np.ndarray | None) -> str:
    if labels is None:
        return "similarity"
    if "label" in outputs:
        return "classification"
    first = _first(outputs)
    if first.ndim == 2 and first.shape[1] > 1:
        return "classification"
    return "regression"


def _first(outputs: Outputs) -> np.ndarray:
    for key in ("probabilities", "variable"):
        if key in outputs:
            return outputs[key]
    return next(iter(outputs.values()))


def predictions(outputs: Outputs, task: str) -> np.ndarray:
    if task == "classification":
        if "label" in outputs:
            return np.asarray(outputs["label"]).ravel()
        return np.asarray(_first(outputs)).argmax(axis=-1)
    return np.asarray(_first(outputs), dtype=np.float64).ravel()


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
        return np.asarray(a, np.float64) == np.asarray(b, np.float64)
    return a.astype(str) == b.astype(str)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


@dataclass
class Evaluation:
    """A model's quality on the validation rows, next to the original's outputs."""

    task: str
    metric: str
    value: float
    n: int
    details: dict[str, Any] = field(default_factory=dict)


def evaluate(outputs: Outputs, labels: np.ndarray | None, reference: Outputs,
             task: str) -> Evaluation:
    n = len(next(iter(outputs.values())))
    if task == "similarity":
        if "label" in reference and "label" in outputs:  # a classifier: same labels?
            same = _same(np.asarray(outputs["label"]).ravel(),
                         np.asarray(reference["label"]).ravel())
            return Evaluation(task, "agreement_with_original", float(same.mean()), n,
                              {"disagreements": int((~same).sum())})
        key = next((k for k in ("probabilities", "variable") if k in reference),
                   next(iter(reference)))
        ref = np.asarray(reference[key], np.float64)
        out = np.asarray(outputs.get(key, next(iter(outputs.values()))), np.float64)
        if ref.shape[0] == out.shape[0] and ref.size == ref.shape[0] == out.size:
            # one number per row (a regressor): cosine of 1-element rows is only a sign test
            ss = float(((ref - ref.mean()) ** 2).sum()) or 1e-30
            r2 = 1 - float(((out - ref) ** 2).sum()) / ss
            return Evaluation(task, "r2_vs_original", r2, n,
                              {"max_abs_diff": float(np.abs(out - ref).max())})
        if ref.shape[0] != out.shape[0] or ref[0].size != out[0].size:
            raise DatasetError(f"Outputs of shape {list(out.shape)} cannot be compared with "
                               f"the original's {list(ref.shape)}.")
        cos = cosine_rows(out, ref)
        return Evaluation(task, "cosine_mean", float(cos.mean()), n,
                          {"cosine_min": float(cos.min()),
                           "max_abs_diff": float(np.max(np.abs(
                               np.asarray(out, np.float64) - np.asarray(ref, np.float64))))})
    pred = predictions(outputs, task)
    ref_pred = predictions(reference, task)
    if task == "classification":
        correct = _same(pred, labels.ravel())
        acc = float(correct.mean())
        lo, hi = wilson(acc, n)
        return Evaluation(task, "accuracy", acc, n, {
            "accuracy_ci95": [round(lo, 4), round(hi, 4)],
            "agreement_with_original": float(_same(pred, ref_pred).mean()),
            "disagreements": int((~_same(pred, ref_pred)).sum())})
    y = np.asarray(labels, np.float64).ravel()
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
    return Evaluation(task, "r2", 1 - ss_res / ss_tot, n, {
        "mae": float(np.abs(y - pred).mean()),
        "max_abs_diff_vs_original": float(np.abs(pred - ref_pred).max())})


@dataclass
class GateResult:
    passed: bool
    ratio: float
    required: float
    reason: str


def gate(candidate: Evaluation, original: Evaluation, threshold: float) -> GateResult:
    """Keep the candidate if its metric >= threshold x the original's, on the same n rows."""
    # threshold x original for the usual positive metric; for a negative one (R² < 0) the same
    # allowed loss, (1 - threshold) x |original|, measured downwards.
    required = original.value - (1 - threshold) * abs(original.value)
    ratio = candidate.value / original.value if original.value else float("inf")
    passed = candidate.value >= required - 1e-12
    verdict = "keeps" if passed else "falls below"
    rule = (f"= {threshold} x original" if original.value >= 0
            else f"= original - {1 - threshold:.3g} x |original|")
    reason = (f"{candidate.metric} {candidate.value:.6f} vs original {original.value:.6f} "
              f"(ratio {ratio:.5f}) {verdict} the required {required:.6f} "
              f"{rule}, on n={candidate.n}")
    return GateResult(passed, ratio, required, reason)
