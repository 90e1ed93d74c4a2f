from __future__ import annotations

import itertools

import numpy as np
import pytest

from federation.metrics import classification_metrics

CLASSES = ("normal", "cyst", "tumour")
AUC_TOL = 1e-12


def _auc_by_pairs(scores: np.ndarray, positive: np.ndarray) -> float:
    """Independent reference: the Mann-Whitney probability P(score_pos > score_neg), ties 1/2."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_per_class_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60) + np.eye(3)[labels] * 0.3

    m = classification_metrics(probs, labels, CLASSES)

    for k, name in enumerate(CLASSES):
        assert m.auc_per_class[name] == pytest.approx(_auc_by_pairs(probs[:, k], labels == k), abs=AUC_TOL)
    assert m.auc_macro == pytest.approx(np.mean(list(m.auc_per_class.values())), abs=AUC_TOL)
    assert m.accuracy == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert m.n == 60


def test_a_perfect_classifier_scores_one_everywhere() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])

    m = classification_metrics(np.eye(3)[labels], labels, CLASSES)

    assert m.auc_macro == 1.0
    assert m.accuracy == 1.0
    assert set(m.auprc_per_class.values()) == {1.0}


def test_an_absent_class_has_no_auc_and_is_left_out_of_the_mean() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])

    m = classification_metrics(probs, labels, CLASSES)

    assert m.auc_per_class["tumour"] is None
    assert m.auc_macro == 1.0


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"probs has shape \(2, 2\), expected \(2, 3\)"):
        classification_metrics(np.zeros((2, 2)), np.array([0, 1]), CLASSES)
