"""Gradient inversion on a tiny Approx-CNN: a plain update leaks the image, a masked or DP one does not."""

from __future__ import annotations

import pytest
import torch

from federation.model import ArchConfig, HeadKind, build_model
from privacy.inversion import (
    InversionConfig,
    batch_gradient,
    dp_gradient,
    image_similarity,
    invert,
    recover_head_input,
    score,
    secagg_masked_gradient,
)

ATTACK = InversionConfig(method="gradients", iterations=300, restarts=1, lr=0.1, tv_weight=1e-3)
FEATURES = InversionConfig(method="features", iterations=300, lr=0.1)  # 16 px wants a larger step than 64
# The feature attack on a SecAgg+-masked update inverts fresh uniform noise each run: over 10 fresh
# masks its SSIM ranged from -0.10 to 0.23 (0.15 failed one run in ten); on the plain update it is
# 0.705. "Fails" is a reconstruction nearer to an unrelated image than half-way to the plain one's.
FEATURES_FAILED_SSIM = 0.35


@pytest.fixture(scope="module")
def setting() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = build_model(ArchConfig(input_size=16, head=HeadKind.FLATTEN), seed=0).eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    disc = ((xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.2).float()  # a bright lesion on a grey body
    image = (0.35 + 0.5 * disc - 0.25 * (xx.abs() > 0.8).float()).clamp(0, 1)[None, None]
    return model, image, torch.tensor([2])


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    va, vb = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float(va @ vb / (va.norm() * vb.norm()))


def test_image_similarity_of_identical_and_unrelated_images() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand((1, 32, 32), generator=g), torch.rand((1, 32, 32), generator=g)
    assert image_similarity(a, a)[0] == pytest.approx(1.0)
    assert image_similarity(a, b)[0] < 0.1


def test_plain_update_is_inverted_to_a_recognisable_image(setting) -> None:  # type: ignore[no-untyped-def]
    model, image, label = setting
    rec = score(image, invert(model, batch_gradient(model, image, label), label, shape=(1, 16, 16), config=ATTACK))
    assert rec.matching_loss < 0.05
    assert rec.ssim[0] > 0.6, rec.ssim
    assert rec.psnr[0] > 15


def test_secagg_masked_upload_is_unrelated_to_the_update_and_inverts_to_noise(setting) -> None:  # type: ignore[no-untyped-def]
    model, image, label = setting
    plain = batch_gradient(model, image, label)
    masked = secagg_masked_gradient(plain, lr=0.01)
    assert abs(_cos(plain, masked)) < 0.05  # the masks make it uniformly random
    rec = score(image, invert(model, masked, label, shape=(1, 16, 16), config=ATTACK))
    assert rec.ssim[0] < 0.15, rec.ssim


def test_dp_gradient_is_the_clipped_gradient_plus_noise(setting) -> None:  # type: ignore[no-untyped-def]
    model, image, label = setting
    plain = batch_gradient(model, image, label)
    norm = float(torch.cat([g.flatten() for g in plain]).norm())
    unclipped = dp_gradient(model, image, label, noise_multiplier=1e-9, max_grad_norm=10 * norm)
    for a, b in zip(plain, unclipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    clipped = dp_gradient(model, image, label, noise_multiplier=1e-9, max_grad_norm=norm / 4)
    assert float(torch.cat([g.flatten() for g in clipped]).norm()) == pytest.approx(norm / 4, rel=1e-3)
    noisy = dp_gradient(model, image, label, noise_multiplier=1.0, max_grad_norm=1.0)
    assert abs(_cos(plain, noisy)) < 0.2  # σC = 1 per coordinate drowns a gradient of norm ≤ 1
    rec = score(image, invert(model, noisy, label, shape=(1, 16, 16), config=ATTACK))
    assert rec.ssim[0] < 0.15, rec.ssim


def test_classifier_input_is_read_off_one_record_s_gradient_exactly(setting) -> None:  # type: ignore[no-untyped-def]
    model, image, label = setting
    seen: dict[str, torch.Tensor] = {}
    hook = model.classifier.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("h", inp[0][0].detach()))
    model(image)
    hook.remove()
    recovered = recover_head_input(model, batch_gradient(model, image, label))
    torch.testing.assert_close(recovered, seen["h"], rtol=1e-4, atol=1e-6)


def test_feature_attack_rebuilds_the_image_and_fails_on_masked_or_noised_updates(setting) -> None:  # type: ignore[no-untyped-def]
    model, image, label = setting
    plain = batch_gradient(model, image, label)
    rec = score(image, invert(model, plain, label, shape=(1, 16, 16), config=FEATURES))
    assert rec.ssim[0] > 0.6, rec.ssim
    for seen in (secagg_masked_gradient(plain, lr=0.01),
                 dp_gradient(model, image, label, noise_multiplier=1.0, max_grad_norm=1.0)):
        rebuilt = score(image, invert(model, seen, label, shape=(1, 16, 16), config=FEATURES))
        assert rebuilt.ssim[0] < FEATURES_FAILED_SSIM, rebuilt.ssim
