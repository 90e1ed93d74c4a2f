"""End-to-end checks and benchmarks of encrypted inference (what ``privrad he check`` / ``bench`` run).

``check`` runs the real client → server → client loop on held-out images: the client
encrypts (seeded symmetric), the server (public keys only, ``workers`` processes) runs the
whole network on ciphertext, the client decrypts. Every HE logit is compared with the
PyTorch model's own float32 output on the same image.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from federation.errors import DataError, HEError
from federation.metrics import classification_metrics
from he_inference.compiler import CompiledModel, CompileOptions, compile_model
from he_inference.engine import LayerTiming
from he_inference.ir import trace
from he_inference.keys import SecretKeys
from he_inference.server import InferenceServer, decrypt_logits, encrypt_image, softmax

__all__ = ["RoundTrip", "compile_checkpoint", "he_check", "layer_table", "read_image", "round_trips"]

Array = npt.NDArray[np.float64]


def read_image(path: Path, preprocess: dict[str, Any]) -> Array:
    """One image for the model: a DICOM slice (windowed and resized as in training) or a ``.npy`` (C, H, W)."""
    from federation.ingest import Preprocess, read_slice

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist")
    if path.suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    return np.asarray(read_slice(path, Preprocess(**preprocess)).numpy(), dtype=np.float64)


def compile_checkpoint(model_path: Path, *, calibration: Array | None = None,
                       options: CompileOptions | None = None,
                       calibration_source: str = "uniform noise") -> tuple[CompiledModel, torch.nn.Module]:
    """Compile a saved privrad checkpoint; the artifact carries the client's preprocessing.

    ``calibration_source`` says in the artifact what the value ranges were measured on
    (``model.he`` goes to the server, and the ranges are statistics of those images).
    """
    from federation.storage import load_checkpoint

    ckpt = load_checkpoint(model_path)
    net = trace(ckpt.model.eval(), classes=tuple(ckpt.meta["classes"]))
    meta = {"preprocess": ckpt.meta.get("preprocess", {}), "source": str(model_path), "source_sha256": ckpt.sha256,
            "calibration": calibration_source}
    return compile_model(net, options=options, calibration=calibration, meta=meta), ckpt.model.eval()


@dataclass
class RoundTrip:
    """One encrypted classification, client and server in one process (no network)."""

    logits: Array
    seconds: float          # client encrypt + server forward pass + client decrypt
    server_seconds: float
    layers: list[LayerTiming]
    upload_bytes: int
    download_bytes: int


def round_trips(model: CompiledModel, keys: SecretKeys, images: Array, *, workers: int,
                say: Callable[[str], None]) -> tuple[list[RoundTrip], float]:
    """Encrypt, classify on ciphertext and decrypt each image; returns the trips and the server's start-up seconds."""
    trips = []
    with InferenceServer(model, keys.public(), workers=workers, progress=say) as server:
        for k, image in enumerate(images):
            t0 = time.perf_counter()
            upload = encrypt_image(model, keys, image)
            t1 = time.perf_counter()
            reply, layers = server.infer(upload)
            t2 = time.perf_counter()
            logits = decrypt_logits(model, keys, reply)
            trips.append(RoundTrip(logits, time.perf_counter() - t0, t2 - t1, layers, len(upload), len(reply)))
            say(f"{k + 1}/{len(images)}: server {t2 - t1:.2f} s, end to end {trips[-1].seconds:.2f} s")
        return trips, server.encode_seconds


def layer_table(timings: list[list[LayerTiming]]) -> list[dict[str, Any]]:
    """Median seconds and the operation counts per layer over several runs."""
    rows = []
    for n, first in enumerate(timings[0]):
        rows.append({"layer": first.name, "seconds_median": statistics.median(t[n].seconds for t in timings),
                     **{k: int(v) for k, v in first.counts.items()}})
    return rows


def he_check(model_path: Path, data: Path, *, n: int = 50, workers: int = 2,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full encrypted loop on the first ``n`` images of ``data``; returns the report (see module doc)."""
    from federation.ingest import Preprocess, load_dataset
    from federation.storage import load_checkpoint

    say = progress or (lambda _m: None)
    ckpt = load_checkpoint(model_path)
    dataset = load_dataset(data, classes=ckpt.meta["classes"], preprocess=Preprocess(**ckpt.meta["preprocess"]))
    if len(dataset) < n:
        raise DataError(data, f"holds {len(dataset)} images, the check needs {n}")
    images = dataset.images.double().numpy()
    checked, labels = images[:n], dataset.labels.numpy()[:n]
    calib = images[n:n + 32] if len(images) >= n + 8 else images[:n]  # calibrate on images not checked when we can
    t0 = time.perf_counter()
    model, torch_model = compile_checkpoint(model_path, calibration=calib)
    compile_s = time.perf_counter() - t0
    say(f"compiled: N={model.params.poly_degree}, depth {model.plan.depth}, {len(model.plan.masks)} masks, "
        f"{len(model.plan.steps)} rotation steps ({compile_s:.1f} s)")
    t0 = time.perf_counter()
    keys = SecretKeys.generate(model.params, model.plan.steps)
    keygen_s = time.perf_counter() - t0
    with torch.no_grad():
        plain = torch_model(torch.as_tensor(checked, dtype=torch.float32)).double().numpy()
    trips, startup_s = round_trips(model, keys, checked, workers=workers, say=say)
    latency = [t.seconds for t in trips]
    he_logits = np.array([t.logits for t in trips])
    if not np.all(np.isfinite(he_logits)):
        raise HEError("decrypted logits are not finite: CKKS overflow (re-compile with more headroom)")
    err = np.abs(he_logits - plain)
    classes = list(model.classes) or [str(c) for c in range(plain.shape[1])]
    report: dict[str, Any] = {
        "n": n, "workers": workers,
        "argmax_agreement": float(np.mean(he_logits.argmax(1) == plain.argmax(1))),
        "max_abs_logit_err": float(err.max()),
        "max_abs_logit": float(np.abs(plain).max()),
        "relative_logit_err": float(err.max() / np.abs(plain).max()),
        "precision_bits": float(-math.log2(max(err.max(), 1e-300))),
        "latency_s_median": statistics.median(latency),
        "latency_s_max": max(latency),
        "server_s_median": statistics.median(t.server_seconds for t in trips),
        "upload_bytes": max(t.upload_bytes for t in trips), "download_bytes": max(t.download_bytes for t in trips),
        "eval_key_bytes": len(keys.public_bytes()),
        "auc_macro_plain": classification_metrics(softmax(plain), labels, classes).auc_macro,
        "auc_macro_he": classification_metrics(softmax(he_logits), labels, classes).auc_macro,
        "ckks": {"poly_degree": model.params.poly_degree, "coeff_bits": list(model.params.coeff_bits),
                 "scale_bits": model.params.scale_bits, "depth": model.plan.depth,
                 "rotation_steps": len(model.plan.steps), "masks": len(model.plan.masks)},
        "compile_s": compile_s, "keygen_s": keygen_s, "server_startup_s": startup_s,
        "layers": layer_table([t.layers for t in trips]),
        "definitions": {
            "latency_s": "client encrypt + server encrypted forward pass + client decrypt, one image, no network",
            "max_abs_logit_err": "max |HE logit - PyTorch float32 logit| over all images and classes",
            "precision_bits": "-log2(max_abs_logit_err)",
        },
    }
    if report["argmax_agreement"] < 1.0:
        say("warning: HE and plaintext disagree on some image")
    return report
