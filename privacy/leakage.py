"""Leakage metrics: how much of an image survives in what an attacker holds.

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

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import torch
from PIL import Image

from federation.errors import DataError
from privacy.inversion import image_similarity
from privacy.keyed import BlockKey, apply_key, invert_key, recover_key

__all__ = ["TIERS", "measure_leakage", "phash_distance", "render_bytes"]

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


def _summary(values: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in ("ssim", "psnr", "phash"):
        arr = np.array([v[metric] for v in values], dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        out[metric] = {"mean": float(finite.mean()) if finite.size else float("inf"),
                       "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}
    return out


def measure_leakage(test: Path, *, model_path: Path, key: BlockKey, out: Path, n: int = 200,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """SSIM, PSNR and pHash distance per tier over the first ``n`` slices of the DICOM folder ``test``.

    Writes ``out/leakage.json`` and ``out/leakage.png`` (three slices, each tier's view).

    Raises
    ------
    DataError
        ``test`` is not a labelled DICOM folder or holds fewer than two slices.
    """
    from federation.ingest import Preprocess, load_dataset
    from federation.storage import atomic_write_json
    from he_inference.check import compile_checkpoint
    from he_inference.keys import SecretKeys
    from he_inference.server import encrypt_image
    from privacy.vault import Keyring, put_file

    compiled, _ = compile_checkpoint(model_path)
    pre = Preprocess(**compiled.meta.get("preprocess", {}))
    data = load_dataset(test, preprocess=pre)
    count = min(n, len(data))
    if count < 2:
        raise DataError(test, f"holds {len(data)} slices; leakage needs at least 2")
    secret = SecretKeys.generate(compiled.params, steps=[])  # encryption needs no Galois keys
    keyed = apply_key(data.images[:count], key)
    rows: dict[str, list[dict[str, float]]] = {t: [] for t in TIERS}
    examples: list[dict[str, np.ndarray]] = []
    recovered = 0
    with tempfile.TemporaryDirectory(prefix="privrad-leakage-") as tmp:
        ring = Keyring.create(Path(tmp) / "site.key", site="leakage")
        for i in range(count):
            truth = data.images[i, 0].double().numpy()
            shape = (truth.shape[0], truth.shape[1])
            info = put_file(Path(tmp) / "vault", Path(test) / data.files[i], ring)
            vault = render_bytes((Path(tmp) / "vault" / "objects" / f"{info.object_id}.pvo").read_bytes(), shape)
            upload = encrypt_image(compiled, secret, data.images[i].double().numpy())
            guess = recover_key(keyed[i:i + 1], key.block)
            recovered += guess == key
            views = {"vault": vault, "ckks": render_bytes(upload, shape),
                     "keyed": keyed[i, 0].double().numpy(),
                     "keyed-attacked": invert_key(keyed[i:i + 1], guess)[0, 0].double().numpy(),
                     "other-patient": data.images[(i + 1) % count, 0].double().numpy()}
            for tier, view in views.items():
                ssim, psnr = image_similarity(torch.from_numpy(truth)[None], torch.from_numpy(view)[None])
                rows[tier].append({"ssim": ssim, "psnr": psnr, "phash": float(phash_distance(truth, view))})
            if i < 3:
                examples.append({"original": truth, **views})
            if progress is not None:
                progress(1)
    result = {"slices": count, "source": str(test), "image_shape": list(data.images.shape[1:]),
              "ckks": {"poly_modulus_degree": compiled.params.poly_degree, "upload_bytes": len(upload)},
              "keyed": {"block": key.block, "key_id": key.key_id, "single_slice_key_recovered": recovered},
              "tiers": {t: _summary(v) for t, v in rows.items()}}
    atomic_write_json(out / "leakage.json", result)
    _plot(examples, result, out / "leakage.png")
    return result


def _plot(examples: list[dict[str, np.ndarray]], result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    from simulations.plots import save_figure

    cols = ["original", *TIERS]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(2.2 * len(cols), 2.4 * len(examples)), dpi=100,
                             squeeze=False)
    for r, ex in enumerate(examples):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(ex[name], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                tier = result["tiers"].get(name)
                extra = f"\nSSIM {tier['ssim']['mean']:.3f}, pHash {tier['phash']['mean']:.0f}" if tier else ""
                ax.set_title(f"{name}{extra}", fontsize=8)
    fig.suptitle(f"what an attacker holds, rendered as images (means over {result['slices']} slices)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
