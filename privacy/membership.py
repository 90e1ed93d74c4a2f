"""Membership-inference audit: can an attacker who holds the global model spot its training records.

Two black-box attacks on the model's per-record cross-entropy loss:

* ``loss`` (Yeom et al. 2018): a record is a member when the target model's loss on it is low.
* ``calibrated`` (difficulty calibration, Watson et al. 2022): the target's loss is compared
  with the loss of a *reference* model that saw none of the hospitals' records (the
  public-pretrained initial model), so that records which are easy for any model do not
  look like members. It is the stronger of the two on a model that starts from a
  pretrained reference.

Members and non-members must come from the same distribution (records of the same sites
held out from training), or the attack measures distribution shift, not membership.
Results are the attack ROC's AUC and its TPR at low FPR, the figures Carlini et al. (2022)
argue for; :func:`dp_tpr_bound` gives the most any attack can reach under (ε, δ)-DP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from federation.errors import DataError
from federation.ingest import ImageSet

__all__ = ["LOW_FPRS", "AttackResult", "dp_tpr_bound", "membership_audit", "per_record_loss", "score_attack"]

LOW_FPRS = (0.01, 0.1)
"""False-positive rates at which the attack's TPR is reported."""

ROC_POINTS = 200
"""ROC points kept per attack (log-spaced in FPR) for plots."""

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class AttackResult:
    """One attack's success: ROC AUC, TPR at low FPR, best advantage (max TPR − FPR)."""

    attack: str
    auc: float
    tpr_at_fpr: dict[str, float]
    advantage: float
    members: int
    nonmembers: int
    roc_fpr: list[float]
    roc_tpr: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@torch.no_grad()
def per_record_loss(model: nn.Module, data: ImageSet, *, batch_size: int = 256) -> Floats:
    """Cross-entropy of ``model`` on each record of ``data`` (no augmentation).

    Computed in float64 as ``softplus(logsumexp_{j≠y}(z_j − z_y))``, which stays exact for
    confidently classified records: the usual ``logsumexp(z) − z_y`` is exactly 0 once the
    logit margin passes about 17 (float32) or 37 (float64), and those ties would hide the
    attack's low-FPR region.
    """
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        z = model(data.images[i:i + batch_size]).double()
        y = data.labels[i:i + batch_size, None]
        margin = (z - z.gather(1, y)).scatter(1, y, -math.inf)
        out.append(nn.functional.softplus(torch.logsumexp(margin, dim=1)))
    return torch.cat(out).numpy()


def _tpr_at(fpr: Floats, tpr: Floats, at: float) -> float:
    """Highest TPR whose FPR does not exceed ``at`` (the ROC is a step function)."""
    ok = fpr <= at + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def score_attack(attack: str, member_scores: Floats, nonmember_scores: Floats) -> AttackResult:
    """Evaluate an attack whose score is higher for records it believes are members.

    Raises
    ------
    DataError
        One of the two groups is empty or a score is not finite.
    """
    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    if m.size == 0 or n.size == 0:
        raise DataError("membership audit", f"needs members and non-members, got {m.size} and {n.size}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise DataError("membership audit", f"attack {attack!r} produced non-finite scores")
    truth = np.r_[np.ones(m.size), np.zeros(n.size)]
    scores = np.r_[m, n]
    fpr, tpr, _ = roc_curve(truth, scores)
    keep = np.unique(np.r_[0, np.searchsorted(fpr, np.geomspace(1e-4, 1, ROC_POINTS)).clip(0, fpr.size - 1),
                           fpr.size - 1])
    return AttackResult(
        attack=attack, auc=float(roc_auc_score(truth, scores)),
        tpr_at_fpr={f"{a:g}": _tpr_at(fpr, tpr, a) for a in LOW_FPRS},
        advantage=float((tpr - fpr).max()), members=int(m.size), nonmembers=int(n.size),
        roc_fpr=[float(v) for v in fpr[keep]], roc_tpr=[float(v) for v in tpr[keep]])


def membership_audit(target: nn.Module, members: ImageSet, nonmembers: ImageSet,
                     *, reference: nn.Module | None = None) -> dict[str, AttackResult]:
    """Run the loss attack (and, given a ``reference`` model, the calibrated one) on ``target``.

    ``reference`` must not have been trained on ``members`` or ``nonmembers``.

    Raises
    ------
    DataError
        The two sets have different classes.
    """
    if members.classes != nonmembers.classes:
        raise DataError("membership audit", f"members have classes {members.classes}, "
                                            f"non-members {nonmembers.classes}")
    lm, ln = per_record_loss(target, members), per_record_loss(target, nonmembers)
    out = {"loss": score_attack("loss", -lm, -ln)}
    if reference is not None:
        rm, rn = per_record_loss(reference, members), per_record_loss(reference, nonmembers)
        out["calibrated"] = score_attack("calibrated", rm - lm, rn - ln)
    return out


def dp_tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    """The highest TPR any membership test can reach at ``fpr`` against an (ε, δ)-DP mechanism.

    The hypothesis-testing characterisation of DP (Kairouz et al. 2015):
    ``TPR ≤ min(e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR))``; ``ε = inf`` bounds nothing.
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    if math.isinf(epsilon):
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)))
