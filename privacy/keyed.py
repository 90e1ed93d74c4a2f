"""Keyed block-wise transform tier: the "Masked-CNN" idea, made honest.

The hospital transforms each image with a secret key before it leaves (learnable image
encryption, Tanaka 2018): the image is cut into ``b × b`` blocks, and inside every block
the pixels are shuffled by one keyed permutation and a keyed subset of positions is
negative-positive flipped (``x → 1 − x``). Block positions stay where they are. The model's
first layer is a block adaptation (``ArchConfig.adapt_block``: a linear map of each block
onto itself, at full resolution), which can represent the key's inverse exactly, so the
Approx-CNN classifies transformed images at plaintext speed.

The adaptation is fitted on the transformed training images alone, without the key and
without labels (:func:`recover_key`): neighbouring pixels of a scan correlate, and the
in-block permutation and flips that make the blocks' covariances those of a smooth image
are the key's (a jigsaw fit). That fit is also the attack that breaks the tier: measured
here, one transformed 64×64 slice gives away the whole key of a 4×4 block. Learning the
adaptation with the classifier from a random start instead (the learnable-encryption
recipe) loses accuracy and protects no better, since the same fit is open to anyone who
holds one transformed image.

What it protects: a casual look at the transformed image. What it does not: the image
against anyone who holds a transformed image (key recovery, above; jigsaw-puzzle solvers
also undo block scrambling, Chuman et al. 2019), nor against the model's holder, whose
adaptation layer is the key's inverse. Use the HE tier when the image must stay
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
from federation.model import INPUT_MEAN, INPUT_STD, BlockAdapt
from federation.storage import atomic_write_bytes

__all__ = ["BlockKey", "adapt_to_key", "apply_key", "invert_key", "latency_per_image", "recover_key"]

KEY_FORMAT = "privrad-block-key/1"

"""The models :func:`train_tier` trains, in order, and how each one's block adaptation is made."""


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


def _neighbour_pairs(block: int) -> list[tuple[int, int, int]]:
    """Adjacent in-block positions: ``(p, q, m)`` with ``q`` right of or below ``p``.

    ``m`` says where ``q`` lies: 0 the same block, 1 the next block to the right, 2 the next
    block down. Each position pairs with its right and its lower neighbour.
    """
    pairs = []
    for r in range(block):
        for c in range(block):
            p = r * block + c
            pairs.append((p, p + 1, 0) if c < block - 1 else (p, r * block, 1))
            pairs.append((p, p + block, 0) if r < block - 1 else (p, c, 2))
    return pairs


def recover_key(images: torch.Tensor, block: int, *, restarts: int = 32, seed: int = 0) -> BlockKey:
    """Recover the key of a keyed block transform from transformed images alone (no key, no labels).

    The attack, and the fit of the keyed model's adaptation layer. Neighbouring pixels of a
    scan correlate, so the key's inverse is the signed in-block permutation under which the
    pixel pairs that end up adjacent (inside a block and across block borders) have the
    largest covariance. The covariances of the ``b²`` in-block positions, with each other and
    with the next block's, are measured on ``images``; the permutation and signs that
    maximise the summed covariance of adjacent pairs are found by a local search (swaps and
    sign changes, ``restarts`` random starts). Negating every sign gives the same sum; the
    global sign is taken that makes the images' outer ring of blocks darker than their middle
    (in CT, the air around the patient).

    Parameters
    ----------
    images
        ``(N, 1, H, W)`` transformed images, ``H`` and ``W`` at least two blocks.
    block
        The transform's block side.

    Raises
    ------
    ConfigError
        Images of the wrong shape, or fewer than two blocks a side.
    """
    if images.ndim != 4 or images.shape[1] != 1 or block < 2:
        raise ConfigError(f"expected images (N, 1, H, W) and a block of at least 2, got {tuple(images.shape)}, "
                          f"{block}")
    if images.shape[-1] % block or images.shape[-2] % block or min(images.shape[-2:]) < 2 * block:
        raise ConfigError(f"image side {tuple(images.shape[-2:])} must be a multiple of {block} and at least two "
                          "blocks")
    u = F.pixel_unshuffle(images.double(), block)
    u = u - u.mean(dim=(0, 2, 3), keepdim=True)
    cov = torch.stack([torch.einsum("nihw,njhw->ij", u, u) / u[:, 0].numel(),
                       torch.einsum("nihw,njhw->ij", u[..., :-1], u[..., 1:]) / u[:, 0, :, :-1].numel(),
                       torch.einsum("nihw,njhw->ij", u[:, :, :-1], u[:, :, 1:]) / u[:, 0, :-1].numel()]).numpy()
    pairs = np.array(_neighbour_pairs(block))
    p, q, m = pairs[:, 0], pairs[:, 1], pairs[:, 2]

    def score(pos: np.ndarray, sign: np.ndarray) -> float:  # pos[k]: the transformed position at position k
        i, j = pos[p], pos[q]
        return float((sign[i] * sign[j] * cov[m, i, j]).sum())

    n = block * block
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] = (-np.inf, np.arange(n), np.ones(n))
    for _ in range(restarts):
        pos, sign = rng.permutation(n), rng.choice([-1.0, 1.0], n)
        current, improved = score(pos, sign), True
        while improved:
            improved = False
            for a in range(n):
                sign[a] = -sign[a]
                trial = score(pos, sign)
                if trial > current + 1e-12:
                    current, improved = trial, True
                else:
                    sign[a] = -sign[a]
                for b in range(a + 1, n):
                    pos[[a, b]] = pos[[b, a]]
                    trial = score(pos, sign)
                    if trial > current + 1e-12:
                        current, improved = trial, True
                    else:
                        pos[[a, b]] = pos[[b, a]]
        if current > best[0]:
            best = (current, pos.copy(), sign.copy())
    _, pos, sign = best
    permutation = tuple(int(k) for k in np.argsort(pos))  # transformed position j holds original permutation[j]
    candidates = [BlockKey(block, permutation, tuple(bool(s * g < 0) for s in sign)) for g in (1.0, -1.0)]

    def ring_minus_middle(key: BlockKey) -> float:
        x = invert_key(images, key)
        ring = torch.ones(x.shape[-2:], dtype=torch.bool)
        ring[block:-block, block:-block] = False
        return float(x[..., ring].mean() - x[..., ~ring].mean())

    return min(candidates, key=ring_minus_middle)


def adapt_to_key(model: torch.nn.Module, key: BlockKey) -> None:
    """Set ``model``'s block-adaptation layer to the exact inverse of ``key`` and freeze it.

    The layer acts on normalised pixels ``z = (x - INPUT_MEAN) / INPUT_STD``; a flipped pixel
    ``x = 1 - x'`` is ``z = -z' + (1 - 2·INPUT_MEAN) / INPUT_STD``. With it, the model computes
    on transformed images exactly what the same model without the layer computes on plain ones.

    Raises
    ------
    ConfigError
        The model has no block adaptation of the key's block size.
    """
    adapt = getattr(model, "adapt", None)
    if not isinstance(adapt, BlockAdapt) or adapt.block != key.block:
        raise ConfigError(f"the model needs a block adaptation of block {key.block} (ArchConfig.adapt_block)")
    n = key.block * key.block
    weight = torch.zeros(n, n)
    bias = torch.zeros(n)
    for j, (orig, flip) in enumerate(zip(key.permutation, key.flips, strict=True)):
        weight[orig, j] = -1.0 if flip else 1.0
        bias[orig] = (1 - 2 * INPUT_MEAN) / INPUT_STD if flip else 0.0
    with torch.no_grad():
        adapt.mix.weight.copy_(weight[:, :, None, None])
        assert adapt.mix.bias is not None
        adapt.mix.bias.copy_(bias)
    adapt.requires_grad_(False)


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
