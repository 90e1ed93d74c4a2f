"""Small Approx-CNN-family models shared by the HE tests (seeded: the same weights every run)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from federation.model import ArchConfig, PolyAct, Residual, build_model

SHAPE = (1, 16, 16)


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's global generator seeded: the default layer initialisation is then the same every run."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def custom(kernel: int, stride: int, degree: int) -> nn.Module:
    """Conv(k, s) → BatchNorm → PolyAct → AvgPool → Residual(conv3 → PolyAct) → Flatten → Linear on 16x16."""
    return seeded(kernel * 10 + stride, lambda: _custom_unseeded(kernel, stride, degree))


def _custom_unseeded(kernel: int, stride: int, degree: int) -> nn.Module:
    side = 16 // stride // 2
    model = nn.Sequential(
        nn.Conv2d(1, 3, kernel, stride=stride, padding=kernel // 2), nn.BatchNorm2d(3),
        PolyAct(degree, 0.5, channels=3), nn.AvgPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), PolyAct(2, 0.5, channels=3))),
        nn.Flatten(), nn.Linear(3 * side * side, 3))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return perturbed(model, kernel * 10 + stride)


def patchify() -> nn.Module:
    """A 4x4 stride-4 stem (the client's pixel_unshuffle after folding), a degree-4 activation, a classifier."""
    return seeded(3, lambda: perturbed(nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=4), PolyAct(4, 0.5, channels=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), 3))


def residual_net() -> nn.Module:
    """Conv → PolyAct → AvgPool → Residual → strided conv → PolyAct → global pool → Linear, on 16x16."""
    return seeded(3, _residual_unseeded)


def _residual_unseeded() -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), PolyAct(2, 0.5, channels=4), nn.AvgPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PolyAct(2, 0.5, channels=4))),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), PolyAct(2, 0.5, channels=6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


CASES = [
    pytest.param(lambda: perturbed(build_model(ArchConfig(input_size=16, channels=(4, 8)), seed=0), 1), SHAPE,
                 id="approx-cnn-gap-degree2"),
    pytest.param(lambda: perturbed(build_model(ArchConfig(input_size=16, channels=(2, 4), head="flatten",
                                                          residual=True, degree=3), seed=1), 2), SHAPE,
                 id="approx-cnn-flatten-residual-degree3"),
    pytest.param(lambda: custom(5, 2, 3), SHAPE, id="k5-stride2-batchnorm-degree3-residual"),
    pytest.param(lambda: custom(3, 1, 2), SHAPE, id="k3-stride1-degree2-residual"),
    pytest.param(patchify, SHAPE, id="patchify-stem-degree4"),
    pytest.param(lambda: perturbed(build_model(ArchConfig(input_size=32, channels=(2, 4), head="flatten", stem=2),
                                               seed=2), 4), (1, 32, 32),
                 id="approx-cnn-stem2"),
]


def images(shape: tuple[int, int, int], n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *shape))
