"""Evaluation metrics through ``evaluate``, with offline fallbacks that compute the same numbers.

``evaluate.load`` fetches metric scripts from the Hub the first time; offline and uncached it
fails, and spam-hf then computes the metric itself (and says so once in the log).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)
_LOADED: Dict[str, object] = {}
_FAILED: set = set()


def fallback_metric(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    """The metric computed locally: ``accuracy``, ``f1`` (binary), ``matthews_correlation``."""
    p, r = np.asarray(predictions).astype(np.int64), np.asarray(references).astype(np.int64)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"predictions {p.shape} and references {r.shape} must be non-empty and equal in shape")
    if name == "accuracy":
        return float((p == r).mean())
    tp = float(((p == 1) & (r == 1)).sum())
    fp = float(((p == 1) & (r == 0)).sum())
    fn = float(((p == 0) & (r == 1)).sum())
    tn = float(((p == 0) & (r == 0)).sum())
    if name == "f1":
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    if name == "matthews_correlation":
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / den if den else 0.0
    raise ValueError(f"unknown metric {name!r}; supported offline: accuracy, f1, matthews_correlation")


def evaluate_metric(name: str, predictions, references, use_evaluate: bool = True) -> float:
    """``name`` via ``evaluate`` when it can be loaded, else :func:`fallback_metric`."""
    if use_evaluate and name not in _FAILED:
        try:
            if name not in _LOADED:
                import evaluate

                _LOADED[name] = evaluate.load(name)
            return float(_LOADED[name].compute(predictions=predictions, references=references)[name])
        except Exception as e:  # offline / not cached
            _FAILED.add(name)
            logger.warning(f"evaluate.load({name!r}) unavailable ({type(e).__name__}); computing {name} locally")
    return fallback_metric(name, predictions, references)


def compute_metrics_fn(name: str = "accuracy", use_evaluate: Optional[bool] = None) -> Callable:
    """A ``compute_metrics`` for ``Trainer`` on classification logits."""
    if use_evaluate is None:
        import os

        use_evaluate = os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "TRUE")

    def compute(eval_pred) -> Dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        preds = np.argmax(logits, axis=-1)
        return {name: evaluate_metric(name, preds, labels, use_evaluate)}

    return compute
