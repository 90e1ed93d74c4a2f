"""Keyed block-wise transform tier: the "Masked-CNN" idea, made honest.

The hospital transforms each image with a secret key before it leaves (learnable image
encryption, Tanaka 2018): the image is cut into ``b × b`` blocks, and inside every block
the pixels are shuffled by one keyed permutation and a keyed subset of positions is
negative-positive flipped (``x → 1 − x``). Block positions stay where they are. The model's
first layer is a block adaptation (``ArchConfig.adapt_block``: a learned linear map of each
block onto itself, at full resolution), which can represent the key's inverse exactly:
trained on transformed images, the Approx-CNN classifies them at plaintext speed.

What it protects: a casual look at the transformed image, and the exact pixel values
without the key. What it does not: it is a fixed, deterministic, block-local map, so it is
not semantically secure. Known attacks recover images from such block-wise transforms
(jigsaw-puzzle solvers on block scrambling, Chuman et al. 2019; in-block shuffles and NP
flips leave block statistics and edges that a learned inverse exploits, and the model
itself is an oracle for the key's effect). Use the HE tier when the image must stay
confidential against the server.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from federation.errors import ConfigError
from federation.storage import atomic_write_bytes

__all__ = ["BlockKey", "apply_key", "invert_key", "latency_per_image"]

KEY_FORMAT = "privrad-block-key/1"


@dataclass(frozen=True)
class BlockKey:
    """The secret of the keyed transform: block side, in-block permutation, flipped positions."""

    block: int
    permutation: tuple[int, ...]
    flips: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = self.block * self.block
        if self.block < 2:
            raise ConfigError(f"block must be at least 2 pixels, got {self.block}")
        if sorted(self.permutation) != list(range(n)) or len(self.flips) != n:
            raise ConfigError(f"a key of block {self.block} needs a permutation of {n} positions and {n} flips")

    @classmethod
    def generate(cls, block: int = 4) -> BlockKey:
        """A fresh key from the OS's CSPRNG."""
        n = block * block
        rng = secrets.SystemRandom()
        perm = list(range(n))
        rng.shuffle(perm)
        return cls(block, tuple(perm), tuple(bool(rng.getrandbits(1)) for _ in range(n)))

    @property
    def key_id(self) -> str:
        """A short public fingerprint (SHA-256 of the key), safe to record in a model's metadata."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"format": KEY_FORMAT, "block": self.block, "permutation": list(self.permutation),
                "flips": [int(f) for f in self.flips]}

    def save(self, path: Path) -> None:
        """Write atomically, mode 600; refuses to overwrite."""
        if Path(path).exists():
            raise ConfigError(f"{path} exists: refusing to overwrite a key")
        atomic_write_bytes(Path(path), (json.dumps(self.to_dict()) + "\n").encode())
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> BlockKey:
        """Read a key file.

        Raises
        ------
        ConfigError
            Missing or not a block key.
        """
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != KEY_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            return cls(int(d["block"]), tuple(int(p) for p in d["permutation"]), tuple(bool(f) for f in d["flips"]))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such key file") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a privrad block key ({exc})") from None


def _check(images: torch.Tensor, key: BlockKey) -> None:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError(f"expected images (N, 1, H, W), got {tuple(images.shape)}")
    if images.shape[-1] % key.block or images.shape[-2] % key.block:
        raise ConfigError(f"image side {tuple(images.shape[-2:])} is not a multiple of the key's block {key.block}")


def apply_key(images: torch.Tensor, key: BlockKey) -> torch.Tensor:
    """The hospital's transform of ``(N, 1, H, W)`` images in [0, 1]."""
    _check(images, key)
    blocks = F.pixel_unshuffle(images, key.block)[:, list(key.permutation)]
    flips = torch.tensor(key.flips)[None, :, None, None]
    return F.pixel_shuffle(torch.where(flips, 1 - blocks, blocks), key.block)


def invert_key(images: torch.Tensor, key: BlockKey) -> torch.Tensor:
    """The inverse transform (with the key)."""
    _check(images, key)
    blocks = F.pixel_unshuffle(images, key.block)
    flips = torch.tensor(key.flips)[None, :, None, None]
    blocks = torch.where(flips, 1 - blocks, blocks)
    inverse = np.argsort(key.permutation)
    return F.pixel_shuffle(blocks[:, list(inverse)], key.block)


@torch.no_grad()
def latency_per_image(model: torch.nn.Module, images: torch.Tensor, *, key: BlockKey | None = None,
                      repeats: int = 50) -> float:
    """Median seconds to transform (with ``key``) and classify one image on this CPU."""
    model.eval()
    times = []
    for i in range(repeats):
        x = images[i % len(images)][None]
        start = time.perf_counter()
        model(apply_key(x, key) if key is not None else x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_tier(data: Path, *, test: Path, key: BlockKey, out: Path, epochs: int = 30, seed: int = 0,
               size: int = 64, progress: Any = None) -> dict[str, Any]:
    """Train the keyed-transform Approx-CNN and its plain references on the same data; write ``out/tier.json``.

    Three models with the same optimiser, epochs and seed (no flip augmentation: a flip does
    not commute with the keyed transform): ``plain`` (the Approx-CNN on plain images),
    ``plain-adapt`` (the keyed model's architecture on plain images) and ``keyed`` (block
    adaptation first, trained and tested on transformed images). Each is
    evaluated on ``test`` (transformed for ``keyed``) and timed per image on this CPU.
    ``progress(name, epoch)`` is called after each epoch.
    """
    import dataclasses

    from clients.ingest import Preprocess, load_dataset
    from clients.train import EpochStats, TrainConfig, evaluate, train_epochs
    from federation.model import ArchConfig, HeadKind, build_model
    from federation.storage import atomic_write_json, save_checkpoint
    from simulations.centralised import load_training_data

    pre = Preprocess(size=size)
    train_set = load_training_data(data, preprocess=pre)
    test_set = load_dataset(test, preprocess=pre)
    config = TrainConfig(epochs=epochs, augment=False, seed=seed)
    adapted = ArchConfig(input_size=size, head=HeadKind.FLATTEN, adapt_block=key.block)
    variants = (("plain", ArchConfig(input_size=size, head=HeadKind.FLATTEN), None),
                ("plain-adapt", adapted, None), ("keyed", adapted, key))
    results: dict[str, Any] = {"key_id": key.key_id, "block": key.block, "epochs": epochs,
                               "train_images": len(train_set), "test_images": len(test_set), "models": {}}
    for name, arch, k in variants:
        model = build_model(arch, seed=seed)
        ts = dataclasses.replace(train_set, images=apply_key(train_set.images, k)) if k else train_set
        tt = dataclasses.replace(test_set, images=apply_key(test_set.images, k)) if k else test_set

        def on_epoch(s: EpochStats, name: str = name) -> None:
            if progress is not None:
                progress(name, s.epoch)

        start = time.perf_counter()
        train_epochs(model, ts, config=config, on_epoch=on_epoch)
        metrics = evaluate(model, tt)
        latency = latency_per_image(model, test_set.images, key=k)
        save_checkpoint(out / f"{name}.pt", model, meta={
            "classes": list(test_set.classes), "preprocess": dataclasses.asdict(pre), "metrics": metrics,
            "keyed_transform": {"key_id": k.key_id, "block": k.block} if k else None,
            "training": {"mode": f"keyed-tier/{name}", **dataclasses.asdict(config)}})
        results["models"][name] = {"auc_macro": metrics["auc_macro"], "auc_per_class": metrics["auc_per_class"],
                                   "accuracy": metrics["accuracy"], "latency_s_per_image": latency,
                                   "train_seconds": time.perf_counter() - start, "adapt_block": arch.adapt_block}
    atomic_write_json(out / "tier.json", results)
    return results
