from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from federation.errors import ConfigError
from federation.model import (
    ActInit,
    ArchConfig,
    HeadKind,
    ModelKind,
    NormKind,
    PolyAct,
    Residual,
    WSConv2d,
    build_model,
    get_weights,
    relu_poly_coefficients,
    set_weights,
)

# Module types whose inference computation is a polynomial in the input (HE-evaluable).
POLYNOMIAL_MODULES = (WSConv2d, nn.Conv2d, PolyAct, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
                      nn.Linear, nn.Sequential, Residual)
POLY_TOL = 1e-5


@pytest.mark.parametrize("head", list(HeadKind))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", list(NormKind))
def test_approx_cnn_contains_only_polynomial_modules(residual: bool, norm: NormKind, head: HeadKind) -> None:
    model = build_model(ArchConfig(kind=ModelKind.APPROX, residual=residual, norm=norm, head=head))

    offenders = [f"{name}: {type(m).__name__}" for name, m in model.named_modules()
                 if name and not isinstance(m, POLYNOMIAL_MODULES)]

    assert offenders == []


def test_ref_cnn_has_relu_batchnorm_and_max_pool() -> None:
    kinds = {type(m) for m in build_model(ArchConfig(kind=ModelKind.REF)).modules()}

    assert {nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d} <= kinds


@pytest.mark.parametrize("head", list(HeadKind))
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("kind", list(ModelKind))
def test_both_models_give_one_logit_per_class(size: int, kind: ModelKind, head: HeadKind) -> None:
    model = build_model(ArchConfig(kind=kind, input_size=size, head=head)).eval()

    assert model(torch.rand(2, 1, size, size)).shape == (2, 3)


def test_a_patchify_stem_takes_a_256_slice_to_64_before_the_stages() -> None:
    model = build_model(ArchConfig(input_size=256, stem=4, head=HeadKind.FLATTEN)).eval()
    first = model.features[0][0]

    assert (first.weight.shape[2:], first.stride, first.padding) == ((4, 4), 4, 0)
    assert model.classifier.in_features == 64 * 8 * 8
    assert model(torch.rand(2, 1, 256, 256)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"multiple of stem \* 2\*\*len\(channels\) = 32"):
        ArchConfig(input_size=64 + 16, stem=4)


def test_same_seed_gives_the_same_initial_weights() -> None:
    a = build_model(ArchConfig(), seed=7).state_dict()
    b = build_model(ArchConfig(), seed=7).state_dict()

    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_poly_act_evaluates_its_polynomial(degree: int) -> None:
    act = PolyAct(degree, bound=3.0)
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)

    expected = np.polynomial.polynomial.polyval(x.numpy(), relu_poly_coefficients(degree, 3.0))

    np.testing.assert_allclose(act(x.float()).double().numpy(), expected, atol=POLY_TOL)


def test_learnable_poly_act_applies_one_polynomial_per_channel() -> None:
    act = PolyAct(2, bound=0.5, channels=2)
    with torch.no_grad():
        act.coefficients.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 3.0]])[:, :, None, None])
    x = torch.linspace(-2, 2, 8).reshape(1, 1, 2, 4).repeat(1, 2, 1, 1)

    out = act(x)

    torch.testing.assert_close(out[:, 0], 1.0 + 2.0 * x[:, 0] + 0.5 * x[:, 0] ** 2)
    torch.testing.assert_close(out[:, 1], -1.0 + 3.0 * x[:, 1] ** 2)
    assert act.coefficients.requires_grad


def test_relu_fit_improves_with_degree() -> None:
    x = np.linspace(-2, 2, 1001)
    err = [np.abs(np.polynomial.polynomial.polyval(x, relu_poly_coefficients(d, 2.0)) - np.maximum(x, 0)).max()
           for d in (2, 4)]

    assert err[1] < err[0] < 0.5


def test_ws_conv_equals_a_plain_conv_with_its_folded_weight() -> None:
    torch.manual_seed(0)
    layer = WSConv2d(3, 5)
    x = torch.randn(2, 3, 9, 9)

    expected = F.conv2d(x, layer.folded_weight(), layer.bias, padding=1)

    torch.testing.assert_close(layer(x), expected)
    w = layer.folded_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("field", "value", "rule"), [
    ("input_size", 60, "multiple of"), ("degree", 5, "2, 3 or 4"), ("channels", (), "positive"),
    ("num_classes", 1, "at least 2"), ("act_bound", 0.0, "positive"), ("stem", 0, "positive"),
    ("conv_gain", 0.0, "positive"), ("conv_gain", float("inf"), "finite"), ("conv_gain", float("nan"), "finite"),
])
def test_bad_architecture_names_field_and_rule(field: str, value: object, rule: str) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`.*{rule}"):
        ArchConfig(**{field: value})  # type: ignore[arg-type]


def test_architecture_round_trips_through_a_dict() -> None:
    cfg = ArchConfig(kind=ModelKind.REF, channels=(4, 8), input_size=32, residual=True)
    started = ArchConfig(channels=(4, 8), input_size=32, act_init=ActInit.IDENTITY, conv_gain=2.0)

    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    assert ArchConfig.from_dict(json.loads(json.dumps(started.to_dict()))) == started


def test_an_identity_start_makes_the_untrained_network_linear_with_the_given_gain() -> None:
    cfg = ArchConfig(channels=(4, 8), input_size=32, act_init=ActInit.IDENTITY, conv_gain=2.0)
    model = build_model(cfg, seed=0).eval()
    x, y = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)

    at_sum = model(x + y) - model(torch.zeros_like(x))   # linear up to the constant term (biases)
    sum_of = model(x) + model(y) - 2 * model(torch.zeros_like(x))

    torch.testing.assert_close(at_sum, sum_of, atol=1e-5, rtol=1e-4)
    gains = [m.gain for m in model.modules() if isinstance(m, WSConv2d)]
    assert len(gains) == 2
    assert all(torch.equal(g, torch.full_like(g, 2.0)) for g in gains)
    with pytest.raises(ConfigError, match="`act_init` identity needs `learnable_act`"):
        ArchConfig(act_init=ActInit.IDENTITY, learnable_act=False)


def test_residual_blocks_and_convs_build_the_asan_like_resnet_and_round_trip_in_a_checkpoint_config() -> None:
    cfg = ArchConfig(input_size=256, stem=4, head=HeadKind.FLATTEN, residual=True, res_blocks=2, res_convs=2)
    model = build_model(cfg, seed=0).eval()
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    units = [m for m in model.modules() if isinstance(m, Residual)]

    assert len(convs) == 7
    assert len(units) == 2
    assert all(sum(isinstance(m, WSConv2d) for m in u.modules()) == 2 for u in units)
    assert model(torch.rand(2, 1, 256, 256)).shape == (2, 3)
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    assert ArchConfig.from_dict({k: v for k, v in cfg.to_dict().items() if not k.startswith("res_")}).res_blocks == 1
    with pytest.raises(ConfigError, match="`res_blocks` must be ≥ 1 and `res_convs` 1 to 3"):
        ArchConfig(residual=True, res_convs=4)


# ----------------------------------------------------------------------------- scattering front end


def test_scatter_front_with_a_linear_classifier_ships_only_the_classifier() -> None:
    cfg = ArchConfig(input_size=32, channels=(), scatter=2, scatter_angles=4, head=HeadKind.FLATTEN)
    model = build_model(cfg, seed=0)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, cfg.num_classes)
    assert list(model.state_dict()) == ["classifier.weight", "classifier.bias"]   # no filters on the wire
    assert model.classifier.in_features == 25 * 8 * 8                              # K = 1 + 2*4 + 16 at 32 / 4
    twin = build_model(cfg, seed=1)
    set_weights(twin, get_weights(model))
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg


def test_scatter_front_under_conv_stages() -> None:
    cfg = ArchConfig(input_size=32, channels=(8,), scatter=1, scatter_angles=4, head=HeadKind.FLATTEN)
    model = build_model(cfg, seed=0)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, cfg.num_classes)
    assert model.classifier.in_features == 8 * 8 * 8


@pytest.mark.parametrize(("kw", "names"), [
    ({"channels": ()}, "none only with `scatter`"),
    ({"scatter": 5}, "`scatter` must be 0 to 4"),
    ({"scatter": 2, "scatter_angles": 0}, "`scatter_angles` 1 to 16"),
    ({"scatter": 2, "stem": 2, "channels": (4,)}, "cannot follow a `stem`"),
    ({"scatter": 2, "input_size": 36}, r"2\*\*len\(channels\) \* 2\*\*scatter = 32"),
])
def test_scatter_config_errors_name_the_field(kw: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        ArchConfig(**kw)  # type: ignore[arg-type]
