"""Random members of the supported Approx-CNN family, as hypothesis draws them (the compiler's property test).

A :class:`FamilySpec` is plain data (hypothesis shrinks it and prints it on a failure);
:meth:`FamilySpec.build` makes the seeded PyTorch model. The family is what the compiler
promises to handle: 1–24 channels, 16–48 pixel inputs, kernels 1, 3, 5 and 7, strides 1
and 2, zero padding, optional BatchNorm, polynomial activations of degree 2–4, windowed
(2×2) and global average pools, residual bodies of 1–3 convolutions, a flatten or pooled
classifier over 2–10 classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from federation.model import PolyAct, Residual

__all__ = ["ConvSpec", "FamilySpec", "family"]


@dataclass(frozen=True)
class ConvSpec:
    """A convolution and what follows it."""

    channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    degree: int = 2          # the activation after it (0: none)
    batchnorm: bool = False
    pool: bool = False       # a 2x2 average pool after the activation


@dataclass(frozen=True)
class FamilySpec:
    """One random model: the input side, its stages, an optional residual body, the head."""

    side: int
    stages: tuple[ConvSpec, ...]
    residual: tuple[ConvSpec, ...]
    gap: bool
    classes: int
    seed: int

    def build(self) -> nn.Module:
        """The model in eval mode, seeded; BatchNorm statistics and activation coefficients perturbed."""
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            layers: list[nn.Module] = []
            cin, side = 1, self.side
            for c in self.stages:
                layers += _unit(cin, c)
                side = (side + 2 * c.padding - c.kernel) // c.stride + 1
                if c.pool:
                    side //= 2
                cin = c.channels
            if self.residual:
                body: list[nn.Module] = []
                bin_ = cin
                for c in self.residual:
                    body += _unit(bin_, c)
                    bin_ = c.channels
                layers.append(Residual(nn.Sequential(*body)))
            if self.gap:
                layers.append(nn.AdaptiveAvgPool2d(1))
                side = 1
            layers += [nn.Flatten(), nn.Linear(cin * side * side, self.classes)]
            model = nn.Sequential(*layers)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                        m.running_var.uniform_(0.5, 2.0, generator=gen)
                    if isinstance(m, PolyAct):
                        m.coefficients.add_(0.05 * torch.randn(m.coefficients.shape, generator=gen))
        return model.eval()


def _unit(cin: int, c: ConvSpec) -> list[nn.Module]:
    out: list[nn.Module] = [nn.Conv2d(cin, c.channels, c.kernel, stride=c.stride, padding=c.padding)]
    if c.batchnorm:
        out.append(nn.BatchNorm2d(c.channels))
    if c.degree:
        out.append(PolyAct(c.degree, 0.5, channels=c.channels))
    if c.pool:
        out.append(nn.AvgPool2d(2))
    return out


@st.composite
def family(draw: st.DrawFn, *, max_channels: int = 24, sides: tuple[int, int] = (16, 48),
           max_stages: int = 3) -> FamilySpec:
    """A :class:`FamilySpec` whose every layer has a valid output (at least 2 pixels before the head)."""
    side = draw(st.integers(*sides))
    h = side
    stages: list[ConvSpec] = []
    for n in range(draw(st.integers(1, max_stages))):
        kernel = draw(st.sampled_from([k for k in (1, 3, 5, 7) if k <= h]))
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.integers(0, kernel // 2))
        out = (h + 2 * padding - kernel) // stride + 1
        if out < 2:
            break
        pool = out % 2 == 0 and out >= 4 and draw(st.booleans())
        stages.append(ConvSpec(draw(st.integers(1, max_channels)), kernel, stride, padding,
                               degree=draw(st.integers(2, 4)) if n == 0 or draw(st.booleans()) else 0,
                               batchnorm=draw(st.booleans()), pool=pool))
        h = out // 2 if pool else out
    if not stages:   # the first draw did not fit: one 3x3 convolution with padding always does
        stages.append(ConvSpec(draw(st.integers(1, max_channels)), 3, 1, 1, degree=2))
    residual: list[ConvSpec] = []
    if draw(st.booleans()):
        width = stages[-1].channels
        n_body = draw(st.integers(1, 3))
        for n in range(n_body):
            kernel = draw(st.sampled_from([k for k in (1, 3, 5) if k <= h]))
            last = n == n_body - 1
            residual.append(ConvSpec(width if last else draw(st.integers(1, max_channels)), kernel, 1, kernel // 2,
                                     degree=draw(st.integers(2, 4)) if not last or draw(st.booleans()) else 0))
    return FamilySpec(side, tuple(stages), tuple(residual), draw(st.booleans()), draw(st.integers(2, 10)),
                      draw(st.integers(0, 2**31 - 1)))
