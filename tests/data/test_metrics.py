"""Metrics and the gate: accuracy with a Wilson interval, regression, similarity; boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optiserve.data.metrics import (
    Evaluation, cosine_rows, detect_task, evaluate, gate, predictions, wilson,
)


def _z_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval, written out from its textbook form."""
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / denom, (centre + spread) / denom


@pytest.mark.parametrize("p, n", [(0.5, 100), (0.9, 50), (0.97, 169), (0.2, 10)])
def test_wilson_matches_the_formula(p, n):
    lo, hi = wilson(p, n)
    assert (lo, hi) == pytest.approx(_z_interval(p, n), abs=1e-12)
    assert lo < p < hi


def test_wilson_known_values_and_edges():
    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = wilson(1.0, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0.0, 10)[0] == 0.0
    assert wilson(0.7, 0) == (0.0, 1.0)


def test_classification_accuracy_and_agreement():
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])
    ref = {"label": labels.copy(), "probabilities": np.zeros((10, 2))}
    out = {"label": labels.copy(), "probabilities": np.zeros((10, 2))}
    out["label"][:2] = 1 - out["label"][:2]  # two wrong
    assert detect_task(out, labels) == "classification"
    ev = evaluate(out, labels, ref, "classification")
    assert (ev.metric, ev.value, ev.n) == ("accuracy", 0.8, 10)
    assert ev.details["accuracy_ci95"] == [round(x, 4) for x in wilson(0.8, 10)]
    assert ev.details["agreement_with_original"] == 0.8 and ev.details["disagreements"] == 2


def test_classification_from_scores_uses_argmax():
    logits = np.array([[2.0, 0.1, 0.3], [0.0, 0.5, 3.0], [0.2, 1.0, 0.1]])
    labels = np.array([0, 2, 0])
    assert detect_task({"output": logits}, labels) == "classification"
    np.testing.assert_array_equal(predictions({"output": logits}, "classification"), [0, 2, 1])
    ev = evaluate({"output": logits}, labels, {"output": logits}, "classification")
    assert ev.value == pytest.approx(2 / 3)


def test_string_labels_compare_as_text():
    labels = np.array(["yes", "no", "yes"])
    out = {"label": np.array(["yes", "no", "no"], dtype=object)}
    assert evaluate(out, labels, out, "classification").value == pytest.approx(2 / 3)


def test_regression_r2_and_mae():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pred = np.array([1.1, 1.9, 3.2, 3.8, 5.0])
    out = {"variable": pred.reshape(-1, 1)}
    assert detect_task(out, y) == "regression"
    ev = evaluate(out, y, {"variable": y.reshape(-1, 1)}, "regression")
    ss_res, ss_tot = ((y - pred) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    assert ev.metric == "r2" and ev.value == pytest.approx(1 - ss_res / ss_tot)
    assert ev.details["mae"] == pytest.approx(np.abs(y - pred).mean())
    assert ev.details["max_abs_diff_vs_original"] == pytest.approx(0.2)


def test_similarity_cosine():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 16))
    assert detect_task({"emb": ref}, None) == "similarity"
    same = evaluate({"emb": ref}, None, {"emb": ref}, "similarity")
    assert same.metric == "cosine_mean" and same.value == pytest.approx(1.0, abs=1e-12)
    scaled = evaluate({"emb": 3 * ref}, None, {"emb": ref}, "similarity")
    assert scaled.value == pytest.approx(1.0, abs=1e-12)  # cosine ignores scale
    flipped = ref.copy()
    flipped[0] *= -1
    ev = evaluate({"emb": flipped}, None, {"emb": ref}, "similarity")
    assert ev.details["cosine_min"] == pytest.approx(-1.0)
    assert ev.value == pytest.approx((7 - 1) / 8)


def test_cosine_of_zero_rows_is_one():
    np.testing.assert_array_equal(cosine_rows(np.zeros((2, 3)), np.zeros((2, 3))), [1.0, 1.0])


def _ev(value: float, metric: str = "accuracy") -> Evaluation:
    return Evaluation("classification", metric, value, 100)


@pytest.mark.parametrize("threshold, original, candidate, passed", [
    (0.99, 0.90, 0.891, True),      # exactly threshold x original
    (0.99, 0.90, 0.8909, False),    # just below
    (0.99, 0.90, 0.95, True),       # better than the original
    (0.99, 1.00, 0.99, True),
    (0.99, 1.00, 0.9899, False),
    (1.0, 0.90, 0.90, True),        # threshold 1: equal passes...
    (1.0, 0.90, 0.8999999, False),  # ...anything lower fails
    (1.0, 0.90, 0.91, True),
])
def test_gate_boundaries(threshold, original, candidate, passed):
    result = gate(_ev(candidate), _ev(original), threshold)
    assert result.passed is passed
    assert result.required == pytest.approx(threshold * original)
    assert result.ratio == pytest.approx(candidate / original)
    assert ("keeps" if passed else "falls below") in result.reason
    assert "n=100" in result.reason and f"{threshold} x original" in result.reason


def test_gate_with_zero_original():
    result = gate(_ev(0.0), _ev(0.0), 0.99)
    assert result.passed and result.ratio == float("inf")


def test_gate_identical_candidate_passes_for_negative_metric():
    original = Evaluation("regression", "r2", -0.5, 100)
    assert gate(original, original, 0.99).passed


def test_similarity_of_label_only_outputs_is_label_agreement():
    from optiserve.data.metrics import evaluate

    ref = {"label": np.array([0, 1, 0, 1])}
    out = {"label": np.array([1, 0, 0, 1])}
    ev = evaluate(out, None, ref, "similarity")
    assert ev.metric == "agreement_with_original" and ev.value == 0.5
    assert ev.details["disagreements"] == 2


def test_similarity_of_scalar_outputs_is_r2_not_a_sign_test():
    from optiserve.data.metrics import evaluate

    ref = {"variable": np.array([[1.0], [2.0], [3.0], [4.0]])}
    far = {"variable": np.array([[4.0], [3.0], [2.0], [1.0]])}  # same signs, all wrong
    ev = evaluate(far, None, ref, "similarity")
    assert ev.metric == "r2_vs_original" and ev.value < 0
    assert evaluate(ref, None, ref, "similarity").value == 1.0
