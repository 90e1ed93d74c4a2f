"""The trace pass: PyTorch → network, layer by layer, nothing folded yet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federation.errors import UnsupportedLayerError
from he_inference.passes.interpret import run_plain
from he_inference.passes.ir import Conv, Norm
from he_inference.passes.trace import trace
from tests.he_inference.models import CASES, custom, images

TRACE_TOL = 1e-5        # float32 PyTorch vs the float64 traced network


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_the_traced_network_computes_what_the_model_computes(make, shape) -> None:  # type: ignore[no-untyped-def]
    model = make()
    x = images(shape)

    net = trace(model, image_shape=shape)

    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(run_plain(net, x), ref, atol=TRACE_TOL * max(1.0, np.abs(ref).max()), rtol=0)


def test_a_batchnorm_is_traced_as_a_normalisation_not_folded() -> None:
    net = trace(custom(3, 1, 2), image_shape=(1, 16, 16))

    assert [type(op) for op in net.ops[:2]] == [Conv, Norm]
    assert net.transform.unshuffle == 1


def test_tracing_leaves_the_model_untouched() -> None:
    model = custom(5, 2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    trace(model, image_shape=(1, 16, 16))

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("layer", "why"), [(nn.ReLU(), r"ReLU is not a polynomial"),
                                            (nn.MaxPool2d(2), r"max is not a polynomial")])
def test_an_unsupported_layer_is_refused_by_name(layer: nn.Module, why: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(), nn.Linear(2 * 8 * 8, 2))
    if isinstance(layer, nn.MaxPool2d):
        model[3] = nn.Linear(2 * 4 * 4, 2)

    with pytest.raises(UnsupportedLayerError, match=rf"^1 \({type(layer).__name__}\): {why}"):
        trace(model, image_shape=(1, 8, 8))


def test_a_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))

    with pytest.raises(UnsupportedLayerError, match=r"^1 \(BatchNorm2d\): in training mode"):
        trace(model, image_shape=(1, 8, 8))


def test_a_model_without_a_classifier_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="must end with Flatten and a Linear classifier"):
        trace(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).eval(), image_shape=(1, 8, 8))


def test_a_scattering_front_end_is_refused_by_name() -> None:
    from federation.model import ArchConfig, build_model
    model = build_model(ArchConfig(input_size=32, channels=(), scatter=2, scatter_angles=4, head="flatten"))
    with pytest.raises(UnsupportedLayerError, match=r"^front \(ScatterFront\): the scattering modulus"):
        trace(model)
