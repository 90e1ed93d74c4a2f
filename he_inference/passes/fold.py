"""Pass 2, fold: rewrite a traced network so that less runs under encryption (pure, new objects).

Three folds, each a function ``Network -> Network`` that leaves its argument untouched:

* :func:`fold_batchnorm`: a :class:`~he_inference.passes.ir.Norm` (eval-mode BatchNorm2d)
  goes into the convolution right before it (weights and bias scaled per channel).
* :func:`fold_patchify`: a first convolution with kernel = stride and no padding becomes the
  client's ``pixel_unshuffle`` and a 1x1 convolution (it then costs no rotation).
* :func:`fold_pools_into_dense`: average pools right before the classifier become part of
  its weights (no rotations, no level).
* :func:`trim_activations`: an activation's negligible leading coefficients are dropped
  (ReLU's odd part is ``x / 2``, so a degree-3 ReLU fit has a cubic coefficient of ~1e-17:
  it would cost a level and a product, and encode to a zero plaintext).

:func:`fold` applies the four in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from federation.errors import UnsupportedLayerError
from he_inference.passes.ir import Act, AvgPool, Conv, Dense, InputTransform, Network, Norm, Op, Residual

__all__ = ["NEGLIGIBLE", "fold", "fold_batchnorm", "fold_patchify", "fold_pools_into_dense", "trim_activations"]

NEGLIGIBLE = 1e-12   # a leading coefficient this small beside the polynomial's largest is float noise


def _fold_norm(conv: Conv, norm: Norm) -> Conv:
    return Conv(conv.name, conv.weight * norm.scale[:, None, None, None], (conv.bias - norm.mean) * norm.scale
                + norm.shift, conv.stride, conv.padding)


def _fold_norms(ops: Sequence[Op]) -> tuple[Op, ...]:
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Norm):
            last = out[-1] if out else None
            if not isinstance(last, Conv):
                raise UnsupportedLayerError(f"{op.name} (BatchNorm2d): folds only into a convolution right before it")
            out[-1] = _fold_norm(last, op)
        elif isinstance(op, Residual):
            out.append(Residual(op.name, _fold_norms(op.body)))
        else:
            out.append(op)
    return tuple(out)


def fold_batchnorm(net: Network) -> Network:
    """Every normalisation into the convolution right before it.

    Raises
    ------
    UnsupportedLayerError
        A normalisation follows something other than a convolution.
    """
    return replace(net, ops=_fold_norms(net.ops))


def fold_patchify(net: Network) -> Network:
    """A first convolution with kernel = stride > 1, no padding, tiling the image: the client's pixel_unshuffle."""
    first = net.ops[0] if net.ops else None
    if not isinstance(first, Conv):
        return net
    s = first.stride
    _, h, w = net.image_shape
    if not (s[0] == s[1] > 1 and first.weight.shape[2:] == s and first.padding == (0, 0)
            and h % s[0] == 0 and w % s[0] == 0):
        return net
    o, i, k, _ = first.weight.shape
    pointwise = Conv(first.name, first.weight.reshape(o, i * k * k, 1, 1), first.bias)
    transform = InputTransform(net.transform.mean, net.transform.std, unshuffle=s[0])
    return replace(net, transform=transform, ops=(pointwise, *net.ops[1:]))


def fold_pools_into_dense(net: Network) -> Network:
    """Average pools right before the classifier become part of its weights."""
    ops, dense = list(net.ops), net.dense
    shapes = net.shapes()
    while ops and isinstance(ops[-1], AvgPool):
        pool = ops.pop()
        assert isinstance(pool, AvgPool)
        kh, kw = pool.kernel
        w = np.repeat(np.repeat(dense.weight, kh, axis=2), kw, axis=3) / (kh * kw)
        c, h, wd = shapes[len(ops)]
        full = np.zeros((w.shape[0], c, h, wd))
        full[:, :, : w.shape[2], : w.shape[3]] = w
        dense = Dense(dense.name, full, dense.bias)
    return replace(net, ops=tuple(ops), dense=dense)


def _trim(ops: Sequence[Op]) -> tuple[Op, ...]:
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Act):
            coef = op.coef
            while coef.shape[0] > 3 and np.abs(coef[-1]).max() <= NEGLIGIBLE * np.abs(coef).max():
                coef = coef[:-1]
            out.append(op if coef is op.coef else Act(op.name, coef.copy()))
        elif isinstance(op, Residual):
            out.append(Residual(op.name, _trim(op.body)))
        else:
            out.append(op)
    return tuple(out)


def trim_activations(net: Network) -> Network:
    """Drop each activation's leading coefficients that are negligible in every channel, down to degree 2."""
    return replace(net, ops=_trim(net.ops))


def fold(net: Network) -> Network:
    """All folds, in order: normalisations, a patchify stem, the pools before the classifier, activation degrees."""
    return trim_activations(fold_pools_into_dense(fold_patchify(fold_batchnorm(net))))
