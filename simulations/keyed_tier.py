"""The keyed-transform tier's experiment: plain, keyed and keyed-learned Approx-CNNs trained side by side.

The transform, its key and the key-recovery attack are :mod:`privacy.keyed`; this runner
trains the three models from the same initial weights and writes ``tier.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.ingest import Preprocess, load_dataset
from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import atomic_write_json, save_checkpoint
from federation.train import EpochStats, TrainConfig, evaluate, train_epochs
from privacy.keyed import BlockKey, adapt_to_key, apply_key, latency_per_image, recover_key
from simulations.centralised import load_training_data

__all__ = ["TIER_MODELS", "AdaptationFit", "KeyAttack", "TierModel", "TierResult", "train_tier"]

TIER_MODELS = {"plain": "none", "keyed": "fitted without the key", "keyed-learned": "learned, random start"}


@dataclass(frozen=True)
class AdaptationFit:
    """How well the key-free fit on the transformed training slices found the key."""

    images: int
    seconds: float
    recovered_key: bool
    positions_correct: int
    flips_correct: int


@dataclass(frozen=True)
class KeyAttack:
    """How many single transformed test slices give away the whole key."""

    slices: int
    whole_key_recovered: int


@dataclass(frozen=True)
class TierModel:
    """One of the three models: test metrics, latency per image (transform included), training time."""

    auc_macro: float
    auc_per_class: dict[str, float | None]
    accuracy: float
    latency_s_per_image: float
    train_seconds: float
    adapt_block: int


@dataclass(frozen=True)
class TierResult:
    """What :func:`train_tier` measured; :meth:`to_dict` is ``tier.json``."""

    key_id: str
    block: int
    epochs: int
    seed: int
    train_images: int
    test_images: int
    adaptation_fit: AdaptationFit
    single_image_attack: KeyAttack
    models: dict[str, TierModel]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record, field by field."""
        return dataclasses.asdict(self)


def train_tier(data: Path, *, test: Path, key: BlockKey, out: Path, epochs: int = 30, seed: int = 0,
               size: int = 64, progress: Callable[[str, int], None] | None = None) -> TierResult:
    """Train the keyed-transform Approx-CNN and its references on the same data; write ``out/tier.json``.

    Three models from the same initial weights, with the same optimiser, epochs and seed (no
    flip augmentation: a flip does not commute with the keyed transform):

    * ``plain``: the Approx-CNN on plain slices;
    * ``keyed``: block adaptation first, fitted without the key on the transformed training
      slices (:func:`recover_key`, :func:`adapt_to_key`) and kept fixed; the rest trained on
      transformed slices;
    * ``keyed-learned``: the adaptation learned with the classifier from a small random start
      (the learnable-encryption recipe), for comparison.

    Each is evaluated on ``test`` (transformed for the keyed models) and timed per image on
    this CPU, the hospital's transform included. ``tier.json`` also records whether the fit
    recovered ``key`` (checked here only because the simulation holds the key) and, for the
    attack, how many single transformed test slices give away the whole key.
    ``progress(name, epoch)`` is called after each epoch.
    """
    pre = Preprocess(size=size)
    train_set = load_training_data(data, preprocess=pre)
    test_set = load_dataset(test, preprocess=pre)
    keyed_train = dataclasses.replace(train_set, images=apply_key(train_set.images, key))
    keyed_test = dataclasses.replace(test_set, images=apply_key(test_set.images, key))
    start = time.perf_counter()
    fitted = recover_key(keyed_train.images, key.block, seed=seed)
    fit_seconds = time.perf_counter() - start
    attack = [recover_key(keyed_test.images[i:i + 1], key.block, seed=seed) == key
              for i in range(min(len(test_set), 50))]
    config = TrainConfig(epochs=epochs, augment=False, seed=seed)
    plain_arch = ArchConfig(input_size=size, head=HeadKind.FLATTEN)
    adapted = ArchConfig(input_size=size, head=HeadKind.FLATTEN, adapt_block=key.block)
    initial = build_model(plain_arch, seed=seed).state_dict()
    fit = AdaptationFit(images=len(train_set), seconds=fit_seconds, recovered_key=fitted == key,
                        positions_correct=sum(a == b for a, b in zip(fitted.permutation, key.permutation, strict=True)),
                        flips_correct=sum(a == b for a, b in zip(fitted.flips, key.flips, strict=True)))
    models: dict[str, TierModel] = {}
    specs = {"plain": (plain_arch, train_set, test_set), "keyed": (adapted, keyed_train, keyed_test),
             "keyed-learned": (adapted, keyed_train, keyed_test)}
    for name in TIER_MODELS:
        arch, train, tested = specs[name]
        model = build_model(arch, seed=seed)
        loaded = model.load_state_dict(initial, strict=False)  # the same initial weights but the adaptation's
        assert not loaded.unexpected_keys, loaded
        assert all(k.startswith("adapt.") for k in loaded.missing_keys), loaded
        if name == "keyed":
            adapt_to_key(model, fitted)

        def on_epoch(s: EpochStats, name: str = name) -> None:
            if progress is not None:
                progress(name, s.epoch)

        start = time.perf_counter()
        train_epochs(model, train, config=config, on_epoch=on_epoch)
        metrics = evaluate(model, tested)
        k = key if arch.adapt_block > 1 else None
        latency = latency_per_image(model, test_set.images, key=k)
        save_checkpoint(out / f"{name}.pt", model, meta={
            "classes": list(test_set.classes), "preprocess": dataclasses.asdict(pre), "metrics": metrics.to_dict(),
            "keyed_transform": {"key_id": key.key_id, "block": key.block} if k else None,
            "training": {"mode": f"keyed-tier/{name}", **dataclasses.asdict(config)}})
        models[name] = TierModel(auc_macro=metrics.auc_macro, auc_per_class=dict(metrics.auc_per_class),
                                 accuracy=metrics.accuracy, latency_s_per_image=latency,
                                 train_seconds=time.perf_counter() - start, adapt_block=arch.adapt_block)
    result = TierResult(key_id=key.key_id, block=key.block, epochs=epochs, seed=seed, train_images=len(train_set),
                        test_images=len(test_set), adaptation_fit=fit,
                        single_image_attack=KeyAttack(slices=len(attack), whole_key_recovered=sum(attack)),
                        models=models)
    atomic_write_json(out / "tier.json", result.to_dict())
    return result
