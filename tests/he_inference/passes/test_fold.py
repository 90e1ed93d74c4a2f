"""The fold pass: each fold keeps what the network computes (checked against PyTorch) and builds new objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federation.errors import UnsupportedLayerError
from federation.model import PolyAct, relu_poly_coefficients
from he_inference.passes.fold import (
    NEGLIGIBLE,
    fold,
    fold_batchnorm,
    fold_patchify,
    fold_pools_into_dense,
    trim_activations,
)
from he_inference.passes.interpret import run_plain
from he_inference.passes.ir import Act, AvgPool, Network, Norm, Op, Residual
from he_inference.passes.trace import trace
from tests.he_inference.models import CASES, custom, images, patchify

FOLD_TOL = 1e-5   # float32 PyTorch vs the float64 folded network


def _all_ops(ops: tuple[Op, ...]) -> list[Op]:
    return [o for op in ops for o in ([op, *_all_ops(op.body)] if isinstance(op, Residual) else [op])]


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_the_folded_network_computes_what_the_model_computes(make, shape) -> None:  # type: ignore[no-untyped-def]
    model = make()
    x = images(shape)

    net = fold(trace(model, image_shape=shape))

    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(run_plain(net, x), ref, atol=FOLD_TOL * max(1.0, np.abs(ref).max()), rtol=0)
    assert not any(isinstance(op, Norm) for op in _all_ops(net.ops))


def test_a_batchnorm_folds_into_the_convolution_before_it() -> None:
    traced = trace(custom(3, 1, 2), image_shape=(1, 16, 16))

    folded = fold_batchnorm(traced)

    assert len(folded.ops) == len(traced.ops) - 1
    assert isinstance(traced.ops[1], Norm)   # the input is left as it was
    x = images((1, 16, 16))
    np.testing.assert_allclose(run_plain(folded, x), run_plain(traced, x), atol=1e-12, rtol=0)


def test_a_batchnorm_after_anything_but_a_convolution_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2), nn.BatchNorm2d(2),
                          nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval()

    with pytest.raises(UnsupportedLayerError, match=r"^2 \(BatchNorm2d\): folds only into a convolution"):
        fold(trace(model, image_shape=(1, 8, 8)))


def test_a_patchify_first_convolution_becomes_the_clients_pixel_unshuffle() -> None:
    net = fold_patchify(trace(patchify(), image_shape=(1, 16, 16)))

    assert net.transform.unshuffle == 4
    assert net.input_shape == (16, 4, 4)


def test_pools_before_the_classifier_fold_into_its_weights() -> None:
    traced = fold_batchnorm(trace(CASES[0].values[0](), image_shape=(1, 16, 16)))
    assert isinstance(traced.ops[-1], AvgPool)

    folded = fold_pools_into_dense(traced)

    assert not isinstance(folded.ops[-1], AvgPool)
    assert folded.dense.weight.shape[2:] == folded.shapes()[-1][1:]
    x = images((1, 16, 16))
    np.testing.assert_allclose(run_plain(folded, x), run_plain(traced, x), atol=1e-12, rtol=0)


def test_folding_twice_changes_nothing() -> None:
    once = fold(trace(patchify(), image_shape=(1, 16, 16)))

    twice = fold(once)

    assert isinstance(twice, Network)
    assert twice.transform == once.transform
    assert len(twice.ops) == len(once.ops)
    np.testing.assert_array_equal(twice.dense.weight, once.dense.weight)


def test_negligible_leading_coefficients_are_trimmed_and_a_real_cubic_is_kept() -> None:
    relu3 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(3, 0.5, channels=2), nn.Flatten(),
                          nn.Linear(2 * 8 * 8, 2)).eval()
    cubic = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(3, 0.5, channels=2), nn.Flatten(),
                          nn.Linear(2 * 8 * 8, 2)).eval()
    with torch.no_grad():
        cubic[1].coefficients[3].fill_(0.3)
    x = images((1, 8, 8))

    for model, degree in [(relu3, 2), (cubic, 3)]:
        traced = trace(model, image_shape=(1, 8, 8))
        net = trim_activations(traced)
        act = net.ops[1]
        assert isinstance(act, Act)
        assert act.degree == degree
        assert np.abs(run_plain(net, x) - run_plain(traced, x)).max() < 1e-12
    assert abs(relu_poly_coefficients(3, 0.5)[3]) < NEGLIGIBLE   # ReLU's odd part is x / 2: no cubic term
