"""Pass 1, trace: a PyTorch model of the Approx-CNN family → a :class:`~he_inference.passes.ir.Network`.

The walk is in forward order and knows the shape at every point. It translates layer by
layer and folds nothing: a BatchNorm2d becomes a :class:`~he_inference.passes.ir.Norm`, a
patchify first convolution stays a convolution, a pool before the classifier stays a
pool (:mod:`~he_inference.passes.fold` does all three). Anything without a CKKS
equivalent is refused with the layer's name and the reason. The model is not modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.errors import UnsupportedLayerError
from federation.model import CLASSES, INPUT_MEAN, INPUT_STD, PolyAct, PrivradCNN, WSConv2d
from federation.model import Residual as ResidualModule
from he_inference.passes.ir import Act, Array, AvgPool, Conv, Dense, InputTransform, Network, Norm, Op, Residual, Shape

__all__ = ["trace"]

_WHY = {
    "ReLU": "ReLU is not a polynomial; use the Approx-CNN's PolyAct",
    "MaxPool2d": "max is not a polynomial; use AvgPool2d",
    "BatchNorm1d": "only BatchNorm2d after a convolution folds",
}


def _np(t: torch.Tensor) -> Array:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _conv(name: str, m: WSConv2d | nn.Conv2d) -> Conv:
    if isinstance(m, WSConv2d):
        return Conv(name, _np(m.folded_weight()), _np(m.bias), _pair(m.stride), _pair(m.padding))
    if m.groups != 1:
        raise UnsupportedLayerError(f"{name} (Conv2d): groups={m.groups}; only groups=1 is supported")
    if _pair(m.dilation) != (1, 1):
        raise UnsupportedLayerError(f"{name} (Conv2d): dilation={m.dilation}; only dilation 1 is supported")
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{name} (Conv2d): padding_mode={m.padding_mode!r}; only zero padding is "
                                    "supported")
    if isinstance(m.padding, str):
        raise UnsupportedLayerError(f"{name} (Conv2d): padding={m.padding!r}; give the padding in pixels")
    bias: Array = _np(m.bias) if m.bias is not None else np.zeros(m.out_channels)
    return Conv(name, _np(m.weight), bias, _pair(m.stride), _pair(m.padding))


def _norm(name: str, bn: nn.BatchNorm2d) -> Norm:
    if bn.training:
        raise UnsupportedLayerError(f"{name} (BatchNorm2d): in training mode; call model.eval()")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError(f"{name} (BatchNorm2d): no running statistics to fold")
    scale = _np(bn.weight) if bn.weight is not None else np.ones(bn.num_features)
    shift = _np(bn.bias) if bn.bias is not None else np.zeros(bn.num_features)
    return Norm(name, _np(bn.running_mean), scale / np.sqrt(_np(bn.running_var) + bn.eps), shift)


class _Walk:
    """The shape at the current point of the forward order, and the classifier once it is met."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.flat_from: Shape | None = None   # set by Flatten
        self.dense: Dense | None = None

    def module(self, module: nn.Module, name: str) -> list[Op]:
        if self.dense is not None:
            raise UnsupportedLayerError(f"{name} ({type(module).__name__}): layers after the Linear classifier "
                                        "are not supported; the classifier must be the last layer")
        if isinstance(module, nn.Sequential):
            return [op for child_name, child in module.named_children()
                    for op in self.module(child, f"{name}.{child_name}" if name else child_name)]
        if isinstance(module, nn.Identity | nn.Dropout):
            return []
        if self.flat_from is not None and not isinstance(module, nn.Linear):
            raise UnsupportedLayerError(f"{name} ({type(module).__name__}): after Flatten only the Linear "
                                        "classifier is supported")
        if isinstance(module, nn.Flatten):
            self.flat_from = self.shape
            return []
        if isinstance(module, nn.Linear):
            self.dense = self._linear(module, name)
            return []
        if isinstance(module, ResidualModule):
            before = self.shape
            body = self.module(module.body, f"{name}.body")
            if self.shape != before:
                raise UnsupportedLayerError(f"{name} (Residual): the body changes the shape {before} -> {self.shape}")
            return [Residual(name, tuple(body))]
        op = self._layer(module, name)
        self.shape = op.out_shape(self.shape)
        return [op]

    def _layer(self, module: nn.Module, name: str) -> Conv | AvgPool | Norm | Act:
        if isinstance(module, WSConv2d | nn.Conv2d):
            conv = _conv(name, module)
            if conv.weight.shape[1] != self.shape[0]:
                raise UnsupportedLayerError(f"{name}: expects {conv.weight.shape[1]} input channels, gets "
                                            f"{self.shape[0]}")
            return conv
        if isinstance(module, nn.BatchNorm2d):
            return _norm(name, module)
        if isinstance(module, nn.AvgPool2d):
            k, s = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
            if k != s or _pair(module.padding) != (0, 0) or module.ceil_mode:
                raise UnsupportedLayerError(f"{name} (AvgPool2d): only windows equal to the stride without padding "
                                            f"or ceil_mode are supported, got kernel {k}, stride {s}")
            if self.shape[1] % k[0] or self.shape[2] % k[1]:
                raise UnsupportedLayerError(f"{name} (AvgPool2d): input {self.shape[1:]} not divisible by {k}")
            return AvgPool(name, k)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise UnsupportedLayerError(f"{name} (AdaptiveAvgPool2d): only global pooling (output 1) is "
                                            "supported")
            return AvgPool(name, (self.shape[1], self.shape[2]))
        if isinstance(module, PolyAct):
            coef = _np(module.coefficients).reshape(module.degree + 1, -1)
            if coef.shape[1] == 1:
                coef = np.repeat(coef, self.shape[0], axis=1)
            return Act(name, coef)
        why = _WHY.get(type(module).__name__, "no CKKS equivalent")
        raise UnsupportedLayerError(f"{name} ({type(module).__name__}): {why}")

    def _linear(self, module: nn.Linear, name: str) -> Dense:
        if self.flat_from is None:
            raise UnsupportedLayerError(f"{name} (Linear): needs a Flatten before it")
        c, h, w = self.flat_from
        if module.in_features != c * h * w:
            raise UnsupportedLayerError(f"{name} (Linear): {module.in_features} inputs, the feature map has "
                                        f"{c * h * w}")
        bias = _np(module.bias) if module.bias is not None else np.zeros(module.out_features)
        return Dense(name, _np(module.weight).reshape(-1, c, h, w), bias)


def trace(model: nn.Module, *, image_shape: Shape | None = None, classes: Sequence[str] = ()) -> Network:
    """Read ``model`` (not modified) into an unfolded :class:`~he_inference.passes.ir.Network`.

    A :class:`~federation.model.PrivradCNN` brings its input standardisation, image shape and
    classes; any other module is taken as an ``nn.Sequential``-like tree on raw input of
    ``image_shape``.

    Raises
    ------
    UnsupportedLayerError
        A layer has no CKKS equivalent, or the structure is not a chain ending in Linear.
    """
    transform = InputTransform()
    parts: list[tuple[str, nn.Module]] = [("", model)]
    if isinstance(model, PrivradCNN):
        if model.config.adapt_block > 1:
            raise UnsupportedLayerError("adapt (BlockAdapt): the keyed-transform tier's block adaptation runs in "
                                        "plaintext only; compile a model trained on plain slices")
        if model.config.scatter:
            raise UnsupportedLayerError("front (ScatterFront): the scattering modulus is not a polynomial, and the "
                                        "client's input transform does not compute it yet")
        image_shape = (1, model.config.input_size, model.config.input_size)
        transform = InputTransform(mean=INPUT_MEAN, std=INPUT_STD)
        classes = classes or CLASSES[: model.config.num_classes]
        parts = [("features", model.features), ("pool", model.pool), ("flatten", model.flatten),
                 ("classifier", model.classifier)]
    if image_shape is None:
        raise UnsupportedLayerError("image_shape is needed for a model that is not a PrivradCNN")
    walk = _Walk(image_shape)
    ops = [op for part_name, part in parts for op in walk.module(part, part_name)]
    if walk.dense is None:
        raise UnsupportedLayerError("the model must end with Flatten and a Linear classifier")
    return Network(image_shape, transform, tuple(ops), walk.dense, tuple(classes))
