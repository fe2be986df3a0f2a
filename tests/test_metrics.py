"""Metrics: offline fallbacks against brute-force loops, and against `evaluate` where it can be loaded."""

import random

import numpy as np
import pytest

from spam_hf.metrics import compute_metrics_fn, evaluate_metric, fallback_metric


def brute(name, p, r):
    if name == "accuracy":
        return sum(int(a == b) for a, b in zip(p, r)) / len(p)
    tp = sum(1 for a, b in zip(p, r) if a == 1 and b == 1)
    fp = sum(1 for a, b in zip(p, r) if a == 1 and b == 0)
    fn = sum(1 for a, b in zip(p, r) if a == 0 and b == 1)
    tn = sum(1 for a, b in zip(p, r) if a == 0 and b == 0)
    if name == "f1":
        return 2 * tp / (2 * tp + fp + fn)
    return (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5


@pytest.mark.parametrize("name", ["accuracy", "f1", "matthews_correlation"])
def test_fallback_equals_brute_force(name):
    rng = random.Random(0)
    p = [rng.randrange(2) for _ in range(500)]
    r = [rng.randrange(2) for _ in range(500)]
    assert fallback_metric(name, np.array(p), np.array(r)) == pytest.approx(brute(name, p, r), abs=1e-12)


def test_fallback_equals_evaluate_where_available():
    """`evaluate.load` needs the metric script from the Hub or its cache; offline and uncached it cannot run."""
    try:
        import evaluate

        metric = evaluate.load("accuracy")
    except Exception as e:
        pytest.skip(f"evaluate's accuracy script is not cached and the Hub is offline ({type(e).__name__})")
    rng = random.Random(1)
    p = [rng.randrange(3) for _ in range(200)]
    r = [rng.randrange(3) for _ in range(200)]
    assert fallback_metric("accuracy", np.array(p), np.array(r)) == pytest.approx(
        metric.compute(predictions=p, references=r)["accuracy"])


def test_compute_metrics_for_trainer():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    fn = compute_metrics_fn("accuracy", use_evaluate=False)
    assert fn(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0]))) == {"accuracy": pytest.approx(2 / 3)}
    assert evaluate_metric("accuracy", [1, 1], [1, 0], use_evaluate=False) == 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        fallback_metric("bleu", np.array([1]), np.array([1]))
