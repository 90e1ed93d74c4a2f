"""Tracing, packing and the encrypted forward pass, each against the plaintext PyTorch model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from federation.errors import CiphertextError, DepthError, HEError, UnsupportedLayerError
from federation.model import ArchConfig, PolyAct, Residual, build_model
from he_inference.ckks import choose_params
from he_inference.compiler import CompiledModel, compile_model
from he_inference.ir import run_plain, trace
from he_inference.keys import SecretKeys
from he_inference.plan import SlotSimulator, build_plan
from he_inference.server import InferenceServer, decrypt_logits, encrypt_image

TRACE_TOL = 1e-5        # float32 PyTorch vs the float64 traced network
SIM_TOL = 1e-9          # the slot simulator is exact up to float64 rounding
HE_REL_TOL = 1e-4       # CKKS at a 40-bit scale: error relative to the largest logit magnitude
SLOTS = 8192


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's global generator seeded: the default layer initialisation is then the same every run."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _custom(kernel: int, stride: int, degree: int) -> nn.Module:
    """Conv(k, s) → BatchNorm → PolyAct → AvgPool → Residual(conv3 → PolyAct) → Flatten → Linear on 16x16."""
    return _seeded(kernel * 10 + stride, lambda: _custom_unseeded(kernel, stride, degree))


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
    return _perturbed(model, kernel * 10 + stride)


CASES = [
    pytest.param(lambda: _perturbed(build_model(ArchConfig(input_size=16, channels=(4, 8)), seed=0), 1), (1, 16, 16),
                 id="approx-cnn-gap-degree2"),
    pytest.param(lambda: _perturbed(build_model(ArchConfig(input_size=16, channels=(2, 4), head="flatten",
                                                           residual=True, degree=3), seed=1), 2), (1, 16, 16),
                 id="approx-cnn-flatten-residual-degree3"),
    pytest.param(lambda: _custom(5, 2, 3), (1, 16, 16), id="k5-stride2-batchnorm-degree3-residual"),
    pytest.param(lambda: _custom(3, 1, 2), (1, 16, 16), id="k3-stride1-degree2-residual"),
    pytest.param(lambda: _seeded(3, lambda: _perturbed(nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=4), PolyAct(4, 0.5, channels=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), 3)),
                 (1, 16, 16), id="patchify-stem-degree4"),
    pytest.param(lambda: _perturbed(build_model(ArchConfig(input_size=32, channels=(2, 4), head="flatten", stem=2),
                                                seed=2), 4), (1, 32, 32),
                 id="approx-cnn-stem2"),
]


def _images(shape: tuple[int, int, int], n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *shape))


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_the_traced_network_computes_what_the_model_computes(make, shape) -> None:  # type: ignore[no-untyped-def]
    model = make()
    x = _images(shape)

    net = trace(model, image_shape=shape)

    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(run_plain(net, x), ref, atol=TRACE_TOL * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_the_packed_plan_on_plain_slots_equals_the_network(make, shape) -> None:  # type: ignore[no-untyped-def]
    net = trace(make(), image_shape=shape)
    x = _images(shape)
    plan = build_plan(net, slots=SLOTS, calibration=x)
    sim = SlotSimulator(plan)

    got = np.stack([sim.run(plan.input_layout.pack(net.transform.apply(x[i:i + 1])[0], SLOTS)) for i in range(2)])

    ref = run_plain(net, x)
    np.testing.assert_allclose(got, ref, atol=SIM_TOL * max(1.0, np.abs(ref).max()), rtol=0)


def test_a_patchify_first_convolution_becomes_the_clients_pixel_unshuffle() -> None:
    net = trace(CASES[4].values[0](), image_shape=(1, 16, 16))

    assert net.transform.unshuffle == 4
    assert net.input_shape == (16, 4, 4)


@pytest.mark.parametrize(("layer", "why"), [(nn.ReLU(), r"ReLU is not a polynomial"),
                                            (nn.MaxPool2d(2), r"max is not a polynomial")])
def test_an_unsupported_layer_is_refused_by_name(layer: nn.Module, why: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(), nn.Linear(2 * 8 * 8, 2))
    if isinstance(layer, nn.MaxPool2d):
        model[3] = nn.Linear(2 * 4 * 4, 2)

    with pytest.raises(UnsupportedLayerError, match=rf"^1 \({type(layer).__name__}\): {why}"):
        trace(model, image_shape=(1, 8, 8))


def test_a_network_deeper_than_any_ring_is_refused_with_the_figures() -> None:
    with pytest.raises(DepthError, match=r"needs multiplicative depth 30; .*\(N=32768, 881 bits\) allows 19"):
        choose_params(30)


def test_the_ring_is_the_smallest_that_holds_the_depth() -> None:
    assert choose_params(2).poly_degree == 8192
    assert choose_params(7).poly_degree == 16384
    assert choose_params(8).poly_degree == 32768


@pytest.mark.parametrize(("make", "shape"), [CASES[0], CASES[2], CASES[4]])
def test_the_encrypted_forward_pass_matches_plaintext(make, shape) -> None:  # type: ignore[no-untyped-def]
    net = trace(make(), image_shape=shape)
    x = _images(shape, 1)
    model = compile_model(net, calibration=x)
    keys = SecretKeys.generate(model.params, model.plan.steps)
    with InferenceServer(model, keys.public()) as server:
        reply, timings = server.infer(encrypt_image(model, keys, x[0]))
    got = decrypt_logits(model, keys, reply)
    ref = run_plain(net, x)[0]
    np.testing.assert_allclose(got, ref, atol=HE_REL_TOL * np.abs(ref).max(), rtol=0)
    assert [t.name for t in timings][-1] == net.dense.name


def test_a_compiled_model_reloads_without_pytorch_and_runs_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = CASES[2].values[0]()
    x = _images((1, 16, 16))
    compiled = compile_model(model, calibration=x, image_shape=(1, 16, 16))

    compiled.save(tmp_path / "m.he")
    loaded = CompiledModel.load(tmp_path / "m.he")

    assert loaded.params == compiled.params
    assert loaded.plan.instrs == compiled.plan.instrs
    got = SlotSimulator(loaded.plan).run(loaded.pack(x[0]))
    np.testing.assert_allclose(got, run_plain(trace(model, image_shape=(1, 16, 16)), x[:1])[0], atol=SIM_TOL)


def test_a_tampered_model_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    compiled = compile_model(CASES[0].values[0](), calibration=_images((1, 16, 16)))
    data = bytearray(compiled.to_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.he").write_bytes(bytes(data))

    with pytest.raises(CiphertextError, match="does not match its hash"):
        CompiledModel.load(tmp_path / "bad.he")


def test_values_beyond_the_ckks_headroom_are_refused_at_compile_time() -> None:
    model = CASES[0].values[0]()
    with torch.no_grad():
        model.classifier.weight.mul_(1e6)

    with pytest.raises(HEError, match=r"values reach .* at classifier .* exceeds the CKKS headroom"):
        compile_model(model, calibration=_images((1, 16, 16)))


def test_a_model_too_deep_for_any_ring_is_refused_with_the_figures() -> None:
    model = build_model(ArchConfig(input_size=128, channels=(2,) * 7, degree=3), seed=0).eval()  # 7 x 3 + 1

    with pytest.raises(DepthError, match=r"needs multiplicative depth 22; the largest 128-bit ring .* allows 19"):
        compile_model(model)
