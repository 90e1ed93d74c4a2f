"""privrad's torch.func per-sample gradients against Opacus's hooks and against one backward pass per record."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from federation.errors import ConfigError
from federation.ingest import ImageSet
from federation.model import ArchConfig, HeadKind, build_model
from federation.train import TrainConfig, random_shift
from privacy.dp import DPRandomness, PerSampleGradients, RoundPlan, sample_rate, steps_per_epoch, train_dp_round

GRAD_RTOL = 1e-4
"""float32: per-record gradients agree to 1e-4 of their largest entry, whichever way they are computed."""

ARCHS = [ArchConfig(input_size=32, head=HeadKind.FLATTEN),
         ArchConfig(input_size=32, channels=(8, 16), residual=True, degree=3, learnable_act=False),
         ArchConfig(input_size=32, channels=(6, 10), norm="none", head=HeadKind.GAP)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("arch", ARCHS, ids=["flatten", "residual-deg3", "plain-conv-gap"])
def test_per_sample_gradients_equal_opacus_hooks(arch: ArchConfig) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(7, 1, 32, 32), torch.randint(0, 3, (7,))
    model = build_model(arch, seed=1)
    next(model.parameters()).requires_grad_(False)  # a frozen tensor gets no gradient, the others stay aligned
    gsm = GradSampleModule(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y).backward()
    reference = [p.grad_sample for p in model.parameters() if p.requires_grad]
    gsm._close()
    grads, losses = PerSampleGradients(model)(x[:, None], y)
    assert len(grads) == len(reference)
    for g, r in zip(grads, reference, strict=True):
        assert g.shape == r.shape
        assert _rel(g, r) < GRAD_RTOL
    assert losses.shape == (7,)
    assert torch.allclose(losses, nn.functional.cross_entropy(model(x), y, reduction="none"), atol=1e-5)


def test_k_copies_give_the_gradient_of_the_mean_loss_over_the_copies() -> None:
    torch.manual_seed(0)
    model = build_model(ArchConfig(input_size=32, head=HeadKind.FLATTEN), seed=2)
    copies, y = torch.rand(3, 4, 1, 32, 32), torch.tensor([0, 2, 1])
    grads, _ = PerSampleGradients(model)(copies, y)
    for i in range(3):  # one plain backward pass per record: the independent reference
        model.zero_grad()
        nn.functional.cross_entropy(model(copies[i]), y[i].repeat(4)).backward()
        for g, p in zip(grads, model.parameters(), strict=True):
            assert _rel(g[i], p.grad) < GRAD_RTOL


def test_random_shift_translates_within_the_bound_and_keeps_the_shape() -> None:
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0), 3)
    assert out.shape == x.shape
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 16, where % 16
    assert int((rows - 8).abs().max()) <= 3
    assert int((cols - 8).abs().max()) <= 3
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10  # it does move them
    assert torch.equal(random_shift(x, torch.Generator().manual_seed(0), 0), x)


def test_augmentation_multiplicity_keeps_the_planned_steps_and_learns() -> None:
    torch.manual_seed(0)
    n = 48
    images = torch.rand(n, 1, 32, 32) * 0.2
    labels = torch.arange(n) % 3
    images[labels == 1, :, :16] += 0.6  # a learnable signal: bright top half, bright bottom half
    images[labels == 2, :, 16:] += 0.6
    data = ImageSet(images=images, labels=labels, classes=("a", "b", "c"), files=tuple(f"{i}" for i in range(n)))
    model = build_model(ArchConfig(input_size=32, head=HeadKind.FLATTEN), seed=0)
    train = TrainConfig(epochs=3, batch_size=16, lr=3e-3, schedule="constant", shift=2, aug_mult=4)
    plan = RoundPlan(0.5, 1.0, sample_rate(n, 16), 3 * steps_per_epoch(n, 16), 1e-5)
    before = nn.functional.cross_entropy(model(images), labels).item()
    rng = DPRandomness(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    result = train_dp_round(model, data, train=train, plan=plan, randomness=rng)
    assert result.step_set == (0.5, plan.sample_rate, plan.steps)
    assert nn.functional.cross_entropy(model(images), labels).item() < before


def test_bad_augmentation_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="aug_mult"):
        TrainConfig(aug_mult=0)
    with pytest.raises(ConfigError, match="shift"):
        TrainConfig(shift=-1)
