"""``privrad he check``: the real client → server → client loop on held-out images, against the plaintext model.

The checkpoint is loaded once and compiled through :func:`~he_inference.compiler.compile_checkpoint`
(calibrated on images that are not checked, when there are enough), the client encrypts,
the server runs the whole network on ciphertext (:mod:`he_inference.roundtrip`), the
client decrypts. Every HE logit is compared with the PyTorch model's own float32 output on
the same image; the result is a :class:`CheckReport`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from federation.errors import DataError, HEError
from federation.metrics import classification_metrics
from federation.storage import load_checkpoint
from he_inference.artifact import CompiledModel
from he_inference.client import softmax
from he_inference.compiler import Calibration, compile_checkpoint
from he_inference.images import load_images
from he_inference.roundtrip import LayerRow, layer_table, measure

__all__ = ["CheckReport", "CkksSummary", "he_check"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32   # held-out images the check calibrates on, when the folder has them
MIN_HELD_OUT = 8          # fewer spare images than this: calibrate on the checked ones


@dataclass(frozen=True)
class CkksSummary:
    """The ring and the plan a check ran with."""

    poly_degree: int
    coeff_bits: tuple[int, ...]
    scale_bits: int
    depth: int
    rotation_steps: int
    masks: int

    @classmethod
    def of(cls, model: CompiledModel) -> CkksSummary:
        """The summary of a compiled model."""
        p = model.params
        return cls(p.poly_degree, p.coeff_bits, p.scale_bits, model.depth, len(model.plan.steps),
                   len(model.plan.masks))


@dataclass(frozen=True)
class CheckReport:
    """What ``privrad he check`` measured (see :attr:`DEFINITIONS` for the less obvious fields)."""

    n: int
    workers: int
    argmax_agreement: float
    max_abs_logit_err: float
    max_abs_logit: float
    relative_logit_err: float
    precision_bits: float
    latency_s_median: float
    latency_s_max: float
    server_s_median: float
    upload_bytes: int
    download_bytes: int
    eval_key_bytes: int
    auc_macro_plain: float | None
    auc_macro_he: float | None
    ckks: CkksSummary
    compile_s: float
    keygen_s: float
    server_startup_s: float
    layers: tuple[LayerRow, ...]

    DEFINITIONS: ClassVar[dict[str, str]] = {
        "latency_s": "client encrypt + server encrypted forward pass + client decrypt, one image, no network",
        "max_abs_logit_err": "max |HE logit - PyTorch float32 logit| over all images and classes",
        "precision_bits": "-log2(max_abs_logit_err)",
    }

    def __post_init__(self) -> None:
        if self.n < 1 or not 0.0 <= self.argmax_agreement <= 1.0:
            raise ValueError(f"`n` must be ≥ 1 and `argmax_agreement` in [0, 1], got {self.n} and "
                             f"{self.argmax_agreement}")

    def summary(self) -> dict[str, Any]:
        """The scalar fields (no per-layer table, no ring)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("layers", "definitions", "ckks")}

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the fields in order (the layers as rows), then the definitions."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ([row.to_dict() for row in value] if f.name == "layers"
                           else asdict(value) if isinstance(value, CkksSummary) else value)
        return {**out, "definitions": dict(self.DEFINITIONS)}


def he_check(model_path: Path, data: Path, *, n: int = 50, workers: int = 2,
             progress: Callable[[str], None] | None = None) -> CheckReport:
    """The full encrypted loop on the first ``n`` images of ``data`` (see the module docstring).

    Raises
    ------
    DataError
        ``data`` holds fewer than ``n`` images.
    HEError
        The decrypted logits are not finite (CKKS overflow).
    """
    say = progress or (lambda _m: None)
    ckpt = load_checkpoint(model_path)
    dataset = load_images(data, meta=ckpt.meta)
    if len(dataset) < n:
        raise DataError(data, f"holds {len(dataset)} images, the check needs {n}")
    checked, labels = dataset.images[:n], dataset.labels[:n]
    spare = dataset.images[n:n + CALIBRATION_IMAGES]
    calib = spare if len(dataset) >= n + MIN_HELD_OUT else checked   # images not checked, when there are enough
    t0 = time.perf_counter()
    compiled = compile_checkpoint(model_path, checkpoint=ckpt,
                                  calibration=Calibration(calib, f"held-out: {len(calib)} images"))
    model = compiled.compiled
    compile_s = time.perf_counter() - t0
    say(f"compiled: N={model.params.poly_degree}, depth {model.depth}, {len(model.plan.masks)} masks, "
        f"{len(model.plan.steps)} rotation steps ({compile_s:.1f} s)")
    measured = measure(model, compiled.torch_model, checked, workers=workers, say=say)
    plain, he_logits, trips = measured.reference, measured.logits, measured.run.trips
    latency = [t.seconds for t in trips]
    if not np.all(np.isfinite(he_logits)):
        raise HEError("decrypted logits are not finite: CKKS overflow (re-compile with more headroom)")
    err = np.abs(he_logits - plain)
    classes = list(model.classes) or [str(c) for c in range(plain.shape[1])]
    report = CheckReport(
        n=n, workers=workers,
        argmax_agreement=float(np.mean(he_logits.argmax(1) == plain.argmax(1))),
        max_abs_logit_err=float(err.max()), max_abs_logit=float(np.abs(plain).max()),
        relative_logit_err=float(err.max() / np.abs(plain).max()),
        precision_bits=float(-math.log2(max(err.max(), 1e-300))),
        latency_s_median=statistics.median(latency), latency_s_max=max(latency),
        server_s_median=statistics.median(t.server_seconds for t in trips),
        upload_bytes=max(t.upload_bytes for t in trips), download_bytes=max(t.download_bytes for t in trips),
        eval_key_bytes=len(measured.keys.public_bytes()),
        auc_macro_plain=classification_metrics(softmax(plain), labels, classes).auc_macro,
        auc_macro_he=classification_metrics(softmax(he_logits), labels, classes).auc_macro,
        ckks=CkksSummary.of(model), compile_s=compile_s, keygen_s=measured.keygen_seconds,
        server_startup_s=measured.run.startup_seconds,
        layers=layer_table([t.layers for t in trips], model))
    if report.argmax_agreement < 1.0:
        log.warning("HE and plaintext disagree on %d of %d images", round((1 - report.argmax_agreement) * n), n)
        say("warning: HE and plaintext disagree on some image")
    return report
