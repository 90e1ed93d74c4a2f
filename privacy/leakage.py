"""Leakage metrics: how much of an image survives in what an attacker holds (the runner: :mod:`simulations.audits`).

For each slice, what an attacker would hold under each protection is rendered as an image
of the slice's size and compared with the slice as the model sees it (windowed, resized):

* ``vault``: the sealed vault object (AES-256-GCM); its last ``H·W`` bytes as 8-bit pixels;
* ``ckks``: the encrypted upload of the HE tier (CKKS, seeded symmetric encryption under a
  fresh secret key, packed as the compiled model packs it); its last ``H·W`` bytes;
* ``keyed``: the keyed block-transformed image itself (what the keyed tier sends);
* ``keyed-attacked``: that image inverted with the key recovered from it alone
  (:func:`privacy.keyed.recover_key`: no key, no labels, one slice);
* ``other-patient`` (baseline): a different slice of the same set, the similarity two
  unrelated scans already share.

Metrics: SSIM and PSNR (scikit-image, data range 1) and the Hamming distance of 64-bit
perceptual hashes (``imagehash.phash``: 0 = same image, about 32 = unrelated).
"""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

from federation.errors import DataError

__all__ = ["TIERS", "phash_distance", "render_bytes"]

TIERS = ("vault", "ckks", "keyed", "keyed-attacked", "other-patient")


def render_bytes(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """The last ``H·W`` bytes of ``data`` as an ``(H, W)`` image in [0, 1].

    Raises
    ------
    DataError
        ``data`` is shorter than one image.
    """
    n = shape[0] * shape[1]
    if len(data) < n:
        raise DataError(None, f"{len(data)} bytes cannot fill a {shape[0]}×{shape[1]} image")
    return np.frombuffer(data[-n:], dtype=np.uint8).reshape(shape).astype(np.float64) / 255.0


def phash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Hamming distance of the 64-bit perceptual hashes of two images in [0, 1]."""
    def h(x: np.ndarray) -> imagehash.ImageHash:
        return imagehash.phash(Image.fromarray(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)))

    return int(h(a) - h(b))
