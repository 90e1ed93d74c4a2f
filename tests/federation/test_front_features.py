"""Cached front-end features: the same logits, gradients and training as the full forward pass."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from federation.ingest import ImageSet
from federation.model import ArchConfig, HeadKind, build_model
from federation.scatter import scatter_channels
from federation.train import FeatureCache, TrainConfig, evaluate, front_features, predict_proba, train_epochs
from privacy.dp import DPRandomness, PerSampleGradients, RoundPlan, sample_rate, steps_per_epoch, train_dp_round

LOGIT_ATOL = 1e-5   # the same float32 operations, in batches of another size
GRAD_RTOL = 1e-4    # per-record gradients, relative to the largest entry (as in test_per_sample_gradients)

ARCH = ArchConfig(input_size=32, channels=(), scatter=2, scatter_angles=4, head=HeadKind.FLATTEN)
# the linear classifier and one convolution stage on the features (make bench-fl's scattering + CNN rows)
HEADS = pytest.mark.parametrize("arch", [ARCH, dataclasses.replace(ARCH, channels=(8,))], ids=["linear", "conv8"])


def _data(n: int = 40, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g),
                    ("normal", "cyst", "tumor"), tuple(f"{i}.dcm" for i in range(n)))


@HEADS
def test_features_path_gives_the_logits_of_the_full_forward(arch: ArchConfig) -> None:
    model = build_model(arch, seed=1)
    torch.nn.init.normal_(model.classifier.weight, std=0.1)  # not the zero start: logits that differ per image
    data = _data()
    feats = front_features(model, data)
    assert feats is not None
    assert feats.images.shape == (40, scatter_channels(2, 4), 8, 8)
    assert model.classifier.in_features == (scatter_channels(2, 4) * 64 if not arch.channels else 8 * 16)
    with torch.no_grad():
        full = model(data.images)
        cached = model(feats.images, features=True)
    torch.testing.assert_close(cached, full, atol=LOGIT_ATOL, rtol=0)
    assert not torch.allclose(full[0], full[1])
    probs = predict_proba(model, data.images)          # through the cache
    ref = torch.softmax(full, dim=1).double().numpy()
    assert abs(probs - ref).max() < LOGIT_ATOL
    assert evaluate(model, data).auc_macro == pytest.approx(
        evaluate(model, ImageSet(data.images.clone(), data.labels, data.classes, data.files)).auc_macro)


def test_models_without_a_front_end_have_no_features() -> None:
    model = build_model(ArchConfig(input_size=32, head=HeadKind.FLATTEN), seed=0)
    assert front_features(model, _data()) is None
    with pytest.raises(ValueError, match="fixed front end"):
        model(torch.rand(2, 1, 32, 32), features=True)


def test_cache_hits_misses_on_change_and_forgets_collected_images() -> None:
    cache = FeatureCache()
    model = build_model(ARCH, seed=0)
    images = _data().images
    spec = (32, 2, 4)
    first = cache.get(model.front, spec, images)
    assert cache.get(model.front, spec, images) is first
    assert len(cache) == 1
    images[0].fill_(0.5)                                    # an in-place change: a new version, a miss
    again = cache.get(model.front, spec, images)
    assert again is not first
    assert not torch.equal(again[0], first[0])
    torch.testing.assert_close(again[1:], first[1:])
    del images, first, again
    gc.collect()
    assert len(cache) == 0                                  # both entries went with their tensor


def test_cache_keeps_within_its_byte_limit() -> None:
    model = build_model(ARCH, seed=0)
    one = 40 * scatter_channels(2, 4) * 8 * 8 * 4                              # bytes of one set's features
    cache = FeatureCache(limit=int(one * 1.5))
    keep = [_data(seed=s).images for s in range(3)]
    for images in keep:
        cache.get(model.front, (32, 2, 4), images)
    assert len(cache) == 1                                  # least recently used out
    small = FeatureCache(limit=one // 2)
    assert small.get(model.front, (32, 2, 4), keep[0]).shape[0] == 40
    assert len(small) == 0


@HEADS
def test_per_sample_gradients_on_features_equal_those_through_the_front(arch: ArchConfig) -> None:
    model = build_model(arch, seed=2)
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    data = _data(9)
    x = data.images[:, None]                                # (B, k = 1, 1, H, W)
    through, losses = PerSampleGradients(model)(x, data.labels)
    with torch.no_grad():
        feats = model.front(data.images)[:, None]
    cached, cached_losses = PerSampleGradients(model, features=True)(feats, data.labels)
    for a, b in zip(cached, through, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < GRAD_RTOL
    torch.testing.assert_close(cached_losses, losses, atol=LOGIT_ATOL, rtol=0)


def _seeded(seed: int) -> DPRandomness:
    return DPRandomness(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))


def _plan(n: int, cfg: TrainConfig) -> RoundPlan:
    q = sample_rate(n, cfg.batch_size)
    return RoundPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q,
                     steps=cfg.epochs * steps_per_epoch(n, cfg.batch_size), delta=1e-5)


@pytest.mark.parametrize("augment", [False, True], ids=["cached", "augmented-through-front"])
def test_dp_round_on_a_scatter_model_learns_and_spends_what_it_planned(augment: bool) -> None:
    data = _data(60)
    cfg = TrainConfig(epochs=2, batch_size=20, lr=3e-3, optimizer="adamw", schedule="constant", seed=0,
                      augment=augment, aug_mult=2)
    model = build_model(ARCH, seed=0)
    before = model.classifier.weight.detach().clone()
    plan = _plan(len(data), cfg)
    result = train_dp_round(model, data, train=cfg, plan=plan, randomness=_seeded(0))
    assert result.step_set == plan.step_set
    assert not torch.equal(model.classifier.weight, before)


@HEADS
def test_dp_round_with_cached_features_matches_the_full_forward(arch: ArchConfig) -> None:
    """The same seeded sampling and noise: the cache changes no update (beyond float rounding)."""
    data = _data(60)
    cfg = TrainConfig(epochs=1, batch_size=20, lr=3e-3, optimizer="sgd", schedule="constant", seed=0, augment=False)
    a, b = build_model(arch, seed=3), build_model(arch, seed=3)
    train_dp_round(a, data, train=cfg, plan=_plan(60, cfg), randomness=_seeded(7))
    # b trains on features it must compute itself each step: a wrapper that hides the model type from the cache
    wrapped = _Uncached(b)
    train_dp_round(wrapped, data, train=cfg, plan=_plan(60, cfg), randomness=_seeded(7))
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight, atol=1e-5, rtol=0)


class _Uncached(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def test_plain_training_on_cached_features_lowers_the_loss() -> None:
    data = _data(60)
    model = build_model(ARCH, seed=0)
    cfg = TrainConfig(epochs=5, batch_size=20, lr=1e-2, optimizer="adamw", schedule="constant", seed=0,
                      augment=False)
    history = train_epochs(model, data, config=cfg)
    assert history[-1].loss < history[0].loss


@HEADS
def test_an_empty_set_gives_empty_features_and_probabilities(arch: ArchConfig) -> None:
    model = build_model(arch, seed=0)
    empty = torch.zeros(0, 1, 32, 32)
    feats = FeatureCache().get(model.front, (32, 2, 4), empty)
    assert feats.shape == (0, scatter_channels(2, 4), 8, 8)
    probs = predict_proba(model, empty)
    assert probs.shape == (0, 3)
    plain = build_model(ArchConfig(input_size=32, head=HeadKind.FLATTEN), seed=0)
    assert predict_proba(plain, empty).shape == (0, 3)
