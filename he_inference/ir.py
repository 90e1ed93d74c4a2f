"""The Approx-CNN as a short list of linear and polynomial operations (pure, numpy float64).

:func:`trace` reads a PyTorch model of the Approx-CNN family and returns a
:class:`Network`: convolutions with normalisation folded into their weights, average
pools, per-channel polynomial activations, residual units and one dense classifier (a
global average pool or average pool before it is folded into its weights). The fixed
input standardisation and a patchify first convolution (kernel = stride, no padding)
become the client's *input transform*: the hospital applies them before encrypting, so
they cost nothing under encryption. Anything else is refused with the layer's name and
the reason. :func:`run_plain` evaluates a network in plaintext: the reference every
encrypted result is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from federation.errors import UnsupportedLayerError

__all__ = [
    "Act",
    "AvgPool",
    "Conv",
    "Dense",
    "InputTransform",
    "Network",
    "Op",
    "Residual",
    "dense_logits",
    "run_ops",
    "run_plain",
    "trace",
    "value_ranges",
]

Array = npt.NDArray[np.float64]
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Conv:
    """2-D convolution, zero padding: ``weight`` (O, I, kh, kw), ``bias`` (O,)."""

    name: str
    weight: Array
    bias: Array
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

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

    def out_shape(self, shape: Shape) -> Shape:
        """Output (C, H, W) for an input of ``shape``."""
        c, h, w = shape
        return (c, h // self.kernel[0], w // self.kernel[1])


@dataclass(frozen=True)
class Act:
    """Per-channel polynomial ``sum_k coef[k, c] x**k``; ``coef`` has shape (degree + 1, C)."""

    name: str
    coef: Array

    @property
    def degree(self) -> int:
        """Polynomial degree."""
        return int(self.coef.shape[0]) - 1

    def out_shape(self, shape: Shape) -> Shape:
        """Same as the input."""
        return shape


@dataclass(frozen=True)
class Dense:
    """The classifier on the whole (C, H, W) feature map: ``weight`` (K, C, H, W), ``bias`` (K,)."""

    name: str
    weight: Array
    bias: Array


@dataclass(frozen=True)
class Residual:
    """``x + body(x)``; the body keeps the shape."""

    name: str
    body: tuple[Op, ...]

    def out_shape(self, shape: Shape) -> Shape:
        """Same as the input."""
        return shape


Op = Conv | AvgPool | Act | Residual


@dataclass(frozen=True)
class InputTransform:
    """What the client does to a (C, H, W) image in [0, 1] before encrypting it.

    ``(x - mean) / std``, then ``pixel_unshuffle`` by ``unshuffle`` (1: none).
    """

    mean: float = 0.0
    std: float = 1.0
    unshuffle: int = 1

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


# -- tracing --------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> Array:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _conv(name: str, m: nn.Module) -> Conv:
    from federation.model import WSConv2d

    if isinstance(m, WSConv2d):
        w = m.folded_weight()
        bias = m.bias
        return Conv(name, _np(w), _np(bias), _pair(m.stride), _pair(m.padding))
    assert isinstance(m, nn.Conv2d)
    if m.groups != 1:
        raise UnsupportedLayerError(f"{name} (Conv2d): groups={m.groups}; only groups=1 is supported")
    if _pair(m.dilation) != (1, 1):
        raise UnsupportedLayerError(f"{name} (Conv2d): dilation={m.dilation}; only dilation 1 is supported")
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{name} (Conv2d): padding_mode={m.padding_mode!r}; only zero padding is "
                                    "supported")
    if isinstance(m.padding, str):
        raise UnsupportedLayerError(f"{name} (Conv2d): padding={m.padding!r}; give the padding in pixels")
    bias_arr: Array = _np(m.bias) if m.bias is not None else np.zeros(m.out_channels)
    return Conv(name, _np(m.weight), bias_arr, _pair(m.stride), _pair(m.padding))


def _fold_bn(conv: Conv, bn: nn.BatchNorm2d, name: str) -> Conv:
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError(f"{name} (BatchNorm2d): no running statistics to fold")
    scale = _np(bn.weight) if bn.weight is not None else np.ones(bn.num_features)
    shift = _np(bn.bias) if bn.bias is not None else np.zeros(bn.num_features)
    inv = scale / np.sqrt(_np(bn.running_var) + bn.eps)
    return Conv(conv.name, conv.weight * inv[:, None, None, None], (conv.bias - _np(bn.running_mean)) * inv + shift,
                conv.stride, conv.padding)


class _Tracer:
    """Walks a module tree in forward order; knows the shape at every point."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.flat_from: Shape | None = None   # set by Flatten
        self.dense: Dense | None = None

    def walk(self, module: nn.Module, name: str) -> list[Op]:
        from federation.model import PolyAct, WSConv2d
        from federation.model import Residual as ResidualModule

        if self.dense is not None:
            raise UnsupportedLayerError(f"{name} ({type(module).__name__}): layers after the Linear classifier "
                                        "are not supported; the classifier must be the last layer")
        if isinstance(module, nn.Sequential):
            ops: list[Op] = []
            for child_name, child in module.named_children():
                ops += self.walk(child, f"{name}.{child_name}" if name else child_name)
            return _fold_batchnorm(ops)
        if isinstance(module, nn.Identity | nn.Dropout):
            return []
        if self.flat_from is not None and not isinstance(module, nn.Linear):
            raise UnsupportedLayerError(f"{name} ({type(module).__name__}): after Flatten only the Linear "
                                        "classifier is supported")
        if isinstance(module, WSConv2d | nn.Conv2d):
            conv = _conv(name, module)
            if conv.weight.shape[1] != self.shape[0]:
                raise UnsupportedLayerError(f"{name}: expects {conv.weight.shape[1]} input channels, gets "
                                            f"{self.shape[0]}")
            return [self._advance(conv)]
        if isinstance(module, nn.BatchNorm2d):
            if module.training:
                raise UnsupportedLayerError(f"{name} (BatchNorm2d): in training mode; call model.eval()")
            return [_BN(name, module)]  # type: ignore[list-item]
        if isinstance(module, nn.AvgPool2d):
            k, s = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
            if k != s or _pair(module.padding) != (0, 0) or module.ceil_mode:
                raise UnsupportedLayerError(f"{name} (AvgPool2d): only windows equal to the stride without padding "
                                            f"or ceil_mode are supported, got kernel {k}, stride {s}")
            if self.shape[1] % k[0] or self.shape[2] % k[1]:
                raise UnsupportedLayerError(f"{name} (AvgPool2d): input {self.shape[1:]} not divisible by {k}")
            return [self._advance(AvgPool(name, k))]
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise UnsupportedLayerError(f"{name} (AdaptiveAvgPool2d): only global pooling (output 1) is "
                                            "supported")
            return [self._advance(AvgPool(name, (self.shape[1], self.shape[2])))]
        if isinstance(module, PolyAct):
            coef = _np(module.coefficients).reshape(module.degree + 1, -1)
            if coef.shape[1] == 1:
                coef = np.repeat(coef, self.shape[0], axis=1)
            return [self._advance(Act(name, coef))]
        if isinstance(module, ResidualModule):
            before = self.shape
            body = self.walk(module.body, f"{name}.body")
            if self.shape != before:
                raise UnsupportedLayerError(f"{name} (Residual): the body changes the shape {before} -> {self.shape}")
            return [Residual(name, tuple(body))]
        if isinstance(module, nn.Flatten):
            self.flat_from = self.shape
            return []
        if isinstance(module, nn.Linear):
            if self.flat_from is None:
                raise UnsupportedLayerError(f"{name} (Linear): needs a Flatten before it")
            c, h, w = self.flat_from
            if module.in_features != c * h * w:
                raise UnsupportedLayerError(f"{name} (Linear): {module.in_features} inputs, the feature map has "
                                            f"{c * h * w}")
            bias = _np(module.bias) if module.bias is not None else np.zeros(module.out_features)
            self.dense = Dense(name, _np(module.weight).reshape(-1, c, h, w), bias)
            return []
        why = {
            "ReLU": "ReLU is not a polynomial; use the Approx-CNN's PolyAct",
            "MaxPool2d": "max is not a polynomial; use AvgPool2d",
            "BatchNorm1d": "only BatchNorm2d after a convolution folds",
        }.get(type(module).__name__, "no CKKS equivalent")
        raise UnsupportedLayerError(f"{name} ({type(module).__name__}): {why}")

    def _advance(self, op: Conv | AvgPool | Act) -> Conv | AvgPool | Act:
        self.shape = op.out_shape(self.shape)
        return op


@dataclass(frozen=True)
class _BN:
    name: str
    module: nn.BatchNorm2d

    def out_shape(self, shape: Shape) -> Shape:
        return shape


def _fold_batchnorm(ops: Sequence[Any]) -> list[Op]:
    out: list[Op] = []
    for op in ops:
        if isinstance(op, _BN):
            if not out or not isinstance(out[-1], Conv):
                raise UnsupportedLayerError(f"{op.name} (BatchNorm2d): folds only into a convolution right before it")
            out[-1] = _fold_bn(out[-1], op.module, op.name)
        else:
            out.append(op)
    return out


def _fold_pool_into_dense(ops: list[Op], dense: Dense, shapes: list[Shape]) -> tuple[list[Op], Dense]:
    """Average pools right before the classifier become part of its weights (no rotations)."""
    while ops and isinstance(ops[-1], AvgPool):
        pool = ops.pop()
        assert isinstance(pool, AvgPool)
        kh, kw = pool.kernel
        w = np.repeat(np.repeat(dense.weight, kh, axis=2), kw, axis=3) / (kh * kw)
        c, h, wd = shapes[len(ops)]
        full = np.zeros((w.shape[0], c, h, wd))
        full[:, :, : w.shape[2], : w.shape[3]] = w
        dense = Dense(dense.name, full, dense.bias)
    return ops, dense


def trace(model: nn.Module, *, image_shape: Shape | None = None, classes: Sequence[str] = ()) -> Network:
    """Read ``model`` (not modified) into a :class:`Network`.

    A :class:`~federation.model.PrivradCNN` brings its input standardisation, image shape and
    classes; any other module is taken as an ``nn.Sequential``-like tree on raw input of
    ``image_shape``.

    Raises
    ------
    UnsupportedLayerError
        A layer has no CKKS equivalent, or the structure is not a chain ending in Linear.
    """
    from federation.model import CLASSES, INPUT_MEAN, INPUT_STD, PrivradCNN

    transform = InputTransform()
    if isinstance(model, PrivradCNN):
        if model.config.adapt_block > 1:
            raise UnsupportedLayerError("adapt (BlockAdapt): the keyed-transform tier's block adaptation runs in "
                                        "plaintext only; compile a model trained on plain slices")
        image_shape = (1, model.config.input_size, model.config.input_size)
        transform = InputTransform(mean=INPUT_MEAN, std=INPUT_STD)
        classes = classes or CLASSES[: model.config.num_classes]
        parts: list[tuple[str, nn.Module]] = [("features", model.features), ("pool", model.pool),
                                              ("flatten", model.flatten), ("classifier", model.classifier)]
    else:
        parts = [("", model)]
    if image_shape is None:
        raise UnsupportedLayerError("image_shape is needed for a model that is not a PrivradCNN")
    tracer = _Tracer(image_shape)
    ops: list[Op] = []
    for part_name, part in parts:
        ops += tracer.walk(part, part_name)
    if tracer.dense is None:
        raise UnsupportedLayerError("the model must end with Flatten and a Linear classifier")
    # A patchify first convolution (kernel = stride, no padding) is the client's pixel_unshuffle.
    if ops and isinstance(ops[0], Conv):
        first = ops[0]
        s = first.stride
        if s[0] == s[1] > 1 and first.weight.shape[2:] == s and first.padding == (0, 0) \
                and image_shape[1] % s[0] == 0 and image_shape[2] % s[0] == 0:
            o, i, k, _ = first.weight.shape
            ops[0] = Conv(first.name, first.weight.reshape(o, i * k * k, 1, 1), first.bias)
            transform = InputTransform(transform.mean, transform.std, unshuffle=s[0])
    net = Network(image_shape, transform, tuple(ops), tracer.dense, tuple(classes))
    shapes = net.shapes()
    kept, dense = _fold_pool_into_dense(list(ops), tracer.dense, shapes)
    return Network(image_shape, transform, tuple(kept), dense, tuple(classes))


# -- plaintext reference --------------------------------------------------------------------------

def run_ops(ops: Sequence[Op], x: torch.Tensor) -> torch.Tensor:
    """Evaluate ``ops`` on a float64 batch (N, C, H, W) in plaintext."""
    f = torch.nn.functional
    for op in ops:
        if isinstance(op, Conv):
            x = f.conv2d(x, torch.from_numpy(op.weight), torch.from_numpy(op.bias), op.stride, op.padding)
        elif isinstance(op, AvgPool):
            x = f.avg_pool2d(x, op.kernel)
        elif isinstance(op, Act):
            c = torch.from_numpy(op.coef)[:, None, :, None, None]
            x = sum((c[k] * x**k for k in range(op.degree + 1)), torch.zeros_like(x))
        else:
            x = x + run_ops(op.body, x)
    return x


def dense_logits(dense: Dense, x: torch.Tensor) -> torch.Tensor:
    """The classifier on a batch of feature maps."""
    w = torch.from_numpy(dense.weight)
    c, h, wd = w.shape[1:]
    return x[:, :c, :h, :wd].flatten(1) @ w.flatten(1).T + torch.from_numpy(dense.bias)


def run_plain(net: Network, images: Array) -> Array:
    """Logits of ``images`` (N, C, H, W in [0, 1]) through ``net`` in float64."""
    x = run_ops(net.ops, torch.from_numpy(net.transform.apply(images)))
    return dense_logits(net.dense, x).numpy()


def value_ranges(net: Network, calibration: Array | None = None) -> list[float]:
    """Max |value| entering each top-level op, then entering the classifier, then of the logits.

    ``calibration``: images (N, C, H, W) in [0, 1]; default: uniform noise images.
    """
    if calibration is None:
        calibration = np.random.default_rng(0).uniform(0, 1, (8, *net.image_shape))
    x = torch.from_numpy(net.transform.apply(calibration))
    out = []
    for op in net.ops:
        out.append(float(x.abs().max()))
        x = run_ops([op], x)
    out.append(float(x.abs().max()))
    out.append(float(dense_logits(net.dense, x).abs().max()))
    return out
