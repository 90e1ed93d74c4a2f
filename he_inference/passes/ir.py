"""The Approx-CNN as a short list of linear and polynomial operations (pure value types, numpy float64).

A :class:`Network` is what every pass reads and returns: the client's
:class:`InputTransform`, a chain of :data:`Op` (convolutions, average pools, per-channel
affine normalisations, per-channel polynomial activations, residual units) and one
:class:`Dense` classifier on the last feature map. :mod:`~he_inference.passes.trace`
builds it from PyTorch, :mod:`~he_inference.passes.fold` simplifies it (no :class:`Norm`
is left after folding), :mod:`~he_inference.passes.interpret` evaluates it in plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["Act", "Array", "AvgPool", "Conv", "Dense", "InputTransform", "Network", "Norm", "Op", "Residual", "Shape"]

Array = npt.NDArray[np.float64]
Shape = tuple[int, int, int]


class _ShapeKeeping:
    """An op whose output has the shape of its input."""

    def out_shape(self, shape: Shape) -> Shape:
        """Same as the input."""
        return shape


@dataclass(frozen=True)
class Conv:
    """2-D convolution, zero padding: ``weight`` (O, I, kh, kw), ``bias`` (O,)."""

    name: str
    weight: Array
    bias: Array
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.weight.ndim != 4:
            raise ValueError(f"{self.name}: `weight` must be (O, I, kh, kw), got shape {self.weight.shape}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"{self.name}: `bias` must have {self.weight.shape[0]} values, got {self.bias.shape}")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{self.name}: `stride` must be ≥ 1 and `padding` ≥ 0, got {self.stride}, "
                             f"{self.padding}")

    def out_shape(self, shape: Shape) -> Shape:
        """Output (C, H, W) for an input of ``shape``."""
        _, h, w = shape
        kh, kw = self.weight.shape[2:]
        return (self.weight.shape[0], (h + 2 * self.padding[0] - kh) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - kw) // self.stride[1] + 1)


@dataclass(frozen=True)
class AvgPool:
    """Average pool with window = stride ``kernel`` and no padding."""

    name: str
    kernel: tuple[int, int]

    def __post_init__(self) -> None:
        if min(self.kernel) < 1:
            raise ValueError(f"{self.name}: `kernel` must be ≥ 1, got {self.kernel}")

    def out_shape(self, shape: Shape) -> Shape:
        """Output (C, H, W) for an input of ``shape``."""
        c, h, w = shape
        return (c, h // self.kernel[0], w // self.kernel[1])


@dataclass(frozen=True)
class Norm(_ShapeKeeping):
    """Per-channel affine normalisation ``(x - mean) * scale + shift`` (an eval-mode BatchNorm2d).

    It exists only between tracing and folding: :func:`~he_inference.passes.fold.fold`
    moves it into the convolution right before it.
    """

    name: str
    mean: Array
    scale: Array
    shift: Array

    def __post_init__(self) -> None:
        if not self.mean.shape == self.scale.shape == self.shift.shape:
            raise ValueError(f"{self.name}: `mean`, `scale` and `shift` must have one value per channel, got "
                             f"{self.mean.shape}, {self.scale.shape}, {self.shift.shape}")


@dataclass(frozen=True)
class Act(_ShapeKeeping):
    """Per-channel polynomial ``sum_k coef[k, c] x**k``; ``coef`` has shape (degree + 1, C)."""

    name: str
    coef: Array

    def __post_init__(self) -> None:
        if self.coef.ndim != 2 or self.coef.shape[0] < 2:
            raise ValueError(f"{self.name}: `coef` must be (degree + 1, C) with degree ≥ 1, got {self.coef.shape}")

    @property
    def degree(self) -> int:
        """Polynomial degree."""
        return int(self.coef.shape[0]) - 1


@dataclass(frozen=True)
class Dense:
    """The classifier on the whole (C, H, W) feature map: ``weight`` (K, C, H, W), ``bias`` (K,)."""

    name: str
    weight: Array
    bias: Array

    def __post_init__(self) -> None:
        if self.weight.ndim != 4 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"{self.name}: `weight` must be (K, C, H, W) and `bias` (K,), got "
                             f"{self.weight.shape} and {self.bias.shape}")


@dataclass(frozen=True)
class Residual(_ShapeKeeping):
    """``x + body(x)``; the body keeps the shape."""

    name: str
    body: tuple[Op, ...]


Op = Conv | AvgPool | Norm | Act | Residual


@dataclass(frozen=True)
class InputTransform:
    """What the client does to a (C, H, W) image in [0, 1] before encrypting it.

    ``(x - mean) / std``, then ``pixel_unshuffle`` by ``unshuffle`` (1: none).
    """

    mean: float = 0.0
    std: float = 1.0
    unshuffle: int = 1

    def __post_init__(self) -> None:
        if not self.std > 0 or self.unshuffle < 1:
            raise ValueError(f"`std` must be > 0 and `unshuffle` ≥ 1, got {self.std} and {self.unshuffle}")

    def apply(self, images: Array) -> Array:
        """Transform a batch (N, C, H, W)."""
        x = (np.asarray(images, dtype=np.float64) - self.mean) / self.std
        if self.unshuffle > 1:
            x = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), self.unshuffle).numpy()
        return x


@dataclass(frozen=True)
class Network:
    """A traced model: the client's input transform, the encrypted ops, the dense classifier."""

    image_shape: Shape
    transform: InputTransform
    ops: tuple[Op, ...]
    dense: Dense
    classes: tuple[str, ...] = field(default=())

    @property
    def input_shape(self) -> Shape:
        """Shape of what is encrypted (after the input transform)."""
        c, h, w = self.image_shape
        s = self.transform.unshuffle
        return (c * s * s, h // s, w // s)

    def shapes(self) -> list[Shape]:
        """The input shape of every top-level op, then the dense layer's input shape."""
        out = [self.input_shape]
        for op in self.ops:
            out.append(op.out_shape(out[-1]))
        return out
