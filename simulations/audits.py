"""The audits' runners: gradient inversion against a budget sweep, and leakage of the storage tiers.

The attack maths are :mod:`privacy.inversion` (gradients, inversion, similarity) and
:mod:`privacy.leakage` (rendering and perceptual hashes); these runners load the data and
models, attack every setting, and write the JSON records and figures.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.config import RunConfig
from federation.errors import ConfigError, DataError
from federation.ingest import Preprocess, concat, load_dataset, site_folders
from federation.plots import plot_inversion, plot_leakage
from federation.storage import atomic_write_json, load_checkpoint
from he_inference.client import encrypt_image
from he_inference.compiler import compile_checkpoint
from he_inference.keys import SecretKeys
from privacy.inversion import (
    Grads,
    InversionConfig,
    batch_gradient,
    dp_gradient,
    image_similarity,
    invert,
    score,
    secagg_masked_gradient,
)
from privacy.keyed import BlockKey, apply_key, invert_key, recover_key
from privacy.leakage import TIERS, phash_distance, render_bytes
from privacy.vault import Keyring, put_file
from simulations.budget import SweepConfig

__all__ = ["measure_leakage", "run_inversion_audit"]

log = logging.getLogger(__name__)

DEFAULT_ATTACK = InversionConfig()

ABOUT = ("FedSGD worst case: a site sends the gradient of one small batch at the global weights. The server "
         "attacks what it holds under each protection.")


def _sigmas(cfg: SweepConfig) -> dict[str, float]:
    """σ each finite-ε point of the sweep used (from budget.json), largest and smallest ε."""
    budget = json.loads((cfg.run / "budget.json").read_text())
    found = {r["epsilon"]: r["noise_multiplier"][0] for r in budget["points"] if r.get("noise_multiplier")}
    if not found:
        raise ConfigError(f"{cfg.run}/budget.json has no finite-ε point to take σ from")
    keys = sorted(found, key=float)
    return {k: found[k] for k in dict.fromkeys([keys[-1], keys[0]])}


def _population_ssim(truth: torch.Tensor, others: torch.Tensor) -> float:
    """The best SSIM another patient's image reaches against ``truth``: what no leakage already gives."""
    return max(image_similarity(truth, o)[0] for o in others)


def run_inversion_audit(cfg: SweepConfig, *, batch_sizes: Sequence[int] = (1, 32),
                        attack: InversionConfig = DEFAULT_ATTACK, step_lr: float | None = None,
                        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Attack every setting at every batch size on seed 0's initial global model; write inversion.json/.png.

    Each site's attacked batch is drawn from its training records. The baseline
    ``population_ssim`` is the best SSIM that any of up to 200 held-out records (other
    patients, in no update) reaches against the same true image: a reconstruction below
    it shows nothing about the record that a typical abdomen would not. ``progress(setting,
    done, total)`` reports iterations.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    model = load_checkpoint(cfg.run / "init" / "seed-0.pt").model
    for p in model.parameters():
        p.requires_grad_(True)
    pre = Preprocess(size=cfg.image_size)
    sites = [load_dataset(s, preprocess=pre) for s in site_folders(cfg.run / "data")]
    others = concat(load_dataset(s, preprocess=pre) for s in site_folders(cfg.run / "holdout")).images[:200]
    lr = step_lr if step_lr is not None else cfg.learning_rate
    clip = RunConfig().secagg_clipping_range  # the sweep's runs quantise to [-clip, clip]
    sigmas = _sigmas(cfg)
    results: dict[str, Any] = {}
    panel: list[tuple[str, torch.Tensor, torch.Tensor, float, float]] = []
    for batch_size in batch_sizes:
        gen = torch.Generator().manual_seed(attack.seed)
        batches = []
        for site in sites:
            idx = torch.randperm(len(site), generator=gen)[:batch_size]
            batches.append((site.images[idx], site.labels[idx]))
        x, y = batches[0]
        plain = batch_gradient(model, x, y)
        agg = [torch.stack(gs).mean(0) for gs in zip(*(batch_gradient(model, bx, by) for bx, by in batches),
                                                     strict=True)]
        settings: dict[str, tuple[Grads, torch.Tensor, torch.Tensor, str]] = {
            "plain": (plain, y, x, "one site's update"),
            "secagg-masked": (secagg_masked_gradient(plain, lr=lr, clipping_range=clip), y, x,
                              "the same upload, masked by SecAgg+"),
            "secagg-aggregate": (agg, torch.cat([b for _, b in batches]), torch.cat([a for a, _ in batches]),
                                 f"sum of {len(batches)} sites' updates (what SecAgg+ reveals)"),
        }
        for eps, sigma in sigmas.items():
            settings[f"dp-eps-{eps}"] = (dp_gradient(model, x, y, noise_multiplier=sigma,
                                                     max_grad_norm=cfg.max_grad_norm, seed=attack.seed),
                                         y, x, f"the site's DP-SGD step, σ {sigma:.3f} (target ε {eps})")
        rows: dict[str, Any] = {}
        for name, (grads, labels, truth, about) in settings.items():
            label = f"{name} (batch {batch_size})"
            done = 0

            def tick(n: int, label: str = label) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(label, done, attack.iterations * attack.restarts)

            rec = score(truth, invert(model, grads, labels, shape=tuple(x.shape[1:]), config=attack, progress=tick))
            best = int(np.argmax(rec.ssim))
            population = _population_ssim(truth[best], others)
            rows[name] = {"about": about, "images_in_update": len(labels), "best_ssim": rec.ssim[best],
                          "best_psnr": rec.psnr[best], "population_ssim": population,
                          "ssim": rec.ssim, "psnr": rec.psnr, "matching_loss": rec.matching_loss,
                          "seconds": rec.seconds}
            panel.append((label, truth[best], rec.images[rec.match[best]], rec.ssim[best], rec.psnr[best]))
            log.info("inversion %s: best SSIM %.3f (population %.3f), PSNR %.1f dB", label, rec.ssim[best],
                     population, rec.psnr[best])
        results[str(batch_size)] = rows
    out = {"about": ABOUT, "model": str(cfg.run / "init" / "seed-0.pt"), "attack": asdict(attack),
           "batch_sizes": list(batch_sizes), "results": results}
    atomic_write_json(cfg.run / "inversion.json", out)
    plot_inversion(panel, cfg.run / "inversion.png", columns=len(panel) // len(batch_sizes))
    return out


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
    compiled = compile_checkpoint(model_path).compiled
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
            # a throw-away vault that measures what a sealed object shows: pixels with text are measured too
            info = put_file(Path(tmp) / "vault", Path(test) / data.files[i], ring, allow_burned_in=True)
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
    plot_leakage(examples, result, out / "leakage.png", tiers=TIERS)
    return result
