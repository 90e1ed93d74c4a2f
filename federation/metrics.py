"""Diagnostic metrics as in the Asan study: one-vs-rest AUC and AUPRC per class."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["ClassificationMetrics", "classification_metrics", "seed_stats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassificationMetrics:
    """One-vs-rest AUC/AUPRC per class (``None``: the class is absent), their macro mean, accuracy, count."""

    auc_macro: float
    auc_per_class: dict[str, float | None]
    auprc_per_class: dict[str, float | None]
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (``metrics.json``, checkpoint metadata): the fields by name."""
        return {"auc_macro": self.auc_macro, "auc_per_class": dict(self.auc_per_class),
                "auprc_per_class": dict(self.auprc_per_class), "accuracy": self.accuracy, "n": self.n}


def classification_metrics(
    probs: npt.NDArray[np.floating[Any]], labels: npt.NDArray[np.integer[Any]], classes: Sequence[str]
) -> ClassificationMetrics:
    """One-vs-rest AUC/AUPRC per class, their macro mean, and accuracy.

    A class absent from ``labels`` has no defined AUC: it is reported as ``None`` and
    left out of the macro mean (with a warning).

    Returns
    -------
    ClassificationMetrics
        ``auc_macro``, ``auc_per_class``, ``auprc_per_class``, ``accuracy``, ``n``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape != (labels.shape[0], len(classes)):
        raise ValueError(f"probs has shape {probs.shape}, expected ({labels.shape[0]}, {len(classes)})")
    auc: dict[str, float | None] = {}
    auprc: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        positive = labels == k
        if positive.all() or not positive.any():
            log.warning("class %r has %s examples: AUC undefined", name,
                        "only" if positive.all() else "no")
            auc[name] = auprc[name] = None
            continue
        auc[name] = float(roc_auc_score(positive, probs[:, k]))
        auprc[name] = float(average_precision_score(positive, probs[:, k]))
    defined = [v for v in auc.values() if v is not None]
    return ClassificationMetrics(auc_macro=float(np.mean(defined)) if defined else math.nan, auc_per_class=auc,
                   auprc_per_class=auprc, accuracy=float((probs.argmax(axis=1) == labels).mean()),
                   n=int(labels.shape[0]))


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """One figure over seeds: mean, sample standard deviation (0 for one value), min, max, n and the values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size),
            "values": [float(v) for v in arr]}
