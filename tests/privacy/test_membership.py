"""Membership-inference audit on cases whose outcome is known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from federation.errors import DataError
from federation.ingest import ImageSet
from privacy.membership import dp_tpr_bound, membership_audit, per_record_loss, score_attack

CLASSES = ("normal", "cyst", "tumour")


def _set(images: torch.Tensor, labels: torch.Tensor) -> ImageSet:
    return ImageSet(images, labels, CLASSES, tuple(f"r{i}" for i in range(len(labels))))


def _random_records(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return _set(torch.rand((n, 1, 8, 8), generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3))


def _memorise(model: nn.Module, data: ImageSet, steps: int = 400) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.images), data.labels).backward()
        opt.step()
    return model.eval()


def test_separated_scores_give_auc_one_and_full_tpr_at_low_fpr() -> None:
    r = score_attack("x", np.linspace(1, 2, 100), np.linspace(-2, -1, 100))
    assert r.auc == 1.0
    assert r.tpr_at_fpr["0.01"] == 1.0
    assert r.advantage == 1.0
    swapped = score_attack("x", np.linspace(-2, -1, 100), np.linspace(1, 2, 100))
    assert swapped.auc == 0.0
    assert swapped.tpr_at_fpr["0.01"] == 0.0


def test_scores_from_one_distribution_give_chance() -> None:
    rng = np.random.default_rng(0)
    r = score_attack("x", rng.normal(size=4000), rng.normal(size=4000))
    assert r.auc == pytest.approx(0.5, abs=0.03)  # sd of the AUC under the null is 0.0065 here
    assert r.tpr_at_fpr["0.1"] == pytest.approx(0.1, abs=0.04)


def test_a_model_that_memorised_random_labels_is_caught() -> None:
    members, nonmembers = _random_records(64, 1), _random_records(64, 2)
    model = _memorise(_mlp(0), members)
    assert per_record_loss(model, members).max() < 0.05  # memorised: every member's loss is near 0
    result = membership_audit(model, members, nonmembers, reference=_mlp(1).eval())
    # A non-member gets a low loss only when its random label happens to be the class the model
    # guesses (1 in 3), so the best attack reaches about 2/3 + 1/3 * 1/2 = 0.83 AUC at least.
    assert result["loss"].auc > 0.8
    assert result["calibrated"].auc > 0.8
    assert result["loss"].advantage > 0.5  # TPR ≈ 1 at FPR ≈ 1/3


def test_a_model_that_never_saw_either_set_leaks_nothing() -> None:
    members, nonmembers = _random_records(300, 3), _random_records(300, 4)
    model = _memorise(_mlp(0), _random_records(64, 5))  # trained on other records only
    result = membership_audit(model, members, nonmembers, reference=_mlp(1).eval())
    for attack in result.values():
        assert attack.auc == pytest.approx(0.5, abs=0.07)  # 4 sd of the null AUC at 300 vs 300


def test_audit_refuses_empty_or_mismatched_sets() -> None:
    with pytest.raises(DataError, match="needs members and non-members"):
        score_attack("x", np.array([]), np.array([1.0]))
    with pytest.raises(DataError, match="non-finite"):
        score_attack("x", np.array([np.nan]), np.array([1.0]))
    other = ImageSet(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), ("a", "b"), ("x", "y"))
    with pytest.raises(DataError, match="classes"):
        membership_audit(_mlp(0), _random_records(4, 0), other)


def test_dp_bound_is_the_hypothesis_testing_region() -> None:
    assert dp_tpr_bound(math.inf, 1e-5, 0.01) == 1.0
    assert dp_tpr_bound(0.0, 0.0, 0.3) == pytest.approx(0.3)  # ε = 0: no test beats chance
    assert dp_tpr_bound(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_bound(8.0, 1e-5, 0.01) == pytest.approx(1 - math.exp(-8) * (1 - 1e-5 - 0.01))
    small = [dp_tpr_bound(e, 1e-5, 0.01) for e in (0.5, 1, 2, 4)]
    assert small == sorted(small)
    with pytest.raises(ValueError, match="fpr"):
        dp_tpr_bound(1.0, 1e-5, 1.5)


def test_losses_of_confident_records_do_not_tie_at_zero() -> None:
    data = _random_records(50, 7)
    plain = _mlp(3).eval()
    with torch.no_grad():
        reference = nn.functional.cross_entropy(plain(data.images).double(), data.labels, reduction="none")
    np.testing.assert_allclose(per_record_loss(plain, data), reference.numpy(), rtol=1e-12)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.mul_(400.0)  # logits of hundreds: float32 cross-entropy would be exactly 0
    losses = per_record_loss(model, data)
    confident = losses < 1e-6
    assert confident.any()
    assert (losses[confident] > 0).all()
    assert len(np.unique(losses[confident])) == confident.sum()
