"""``privrad he bench``: one encrypted classification timed per layer, against TenSEAL's high-level API.

The baseline is measured in the same run, on the layers TenSEAL's high-level API can
express: the first convolution when its kernel equals its stride (``im2col_encoding`` +
``conv2d_im2col`` per output channel, on as many chunks as the slots require, since it
refuses chunked vectors), the activation after it (``polyval``), and the classifier
(``mm`` on an encrypted feature vector). Its later convolutions are not expressible (the
output of ``conv2d_im2col`` is a flat vector), so no whole-network baseline exists.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch

from federation.errors import HEError
from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import load_checkpoint
from he_inference.compiler import compile_model
from he_inference.passes.fold import fold
from he_inference.passes.ir import Act, Array, Conv, Network
from he_inference.passes.trace import trace
from he_inference.roundtrip import LayerRow, layer_table, measure

__all__ = ["ARCHS", "BenchReport", "TensealBaseline", "run_bench", "tenseal_baseline"]

# The built-in Approx-CNNs per image side: three conv stages of depth 2 each + the head = depth 7.
ARCHS = {
    64: ArchConfig(input_size=64, channels=(16, 32, 64), head=HeadKind.FLATTEN),
    256: ArchConfig(input_size=256, channels=(16, 32, 64), head=HeadKind.FLATTEN, stem=4),
}


def _omit_none(obj: Any) -> dict[str, Any]:
    """A dataclass's fields in order as JSON, leaving out those that were not measured (None)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None:
            out[f.name] = ([row.to_dict() for row in value] if f.name == "layers"
                           else value.to_dict() if isinstance(value, TensealBaseline) else value)
    return out


@dataclass(frozen=True)
class TensealBaseline:
    """Seconds of the layers TenSEAL's high-level API can run (None: not expressible there)."""

    poly_degree: int
    galois_keygen_s: float
    classifier_features: int
    first_conv_act_s: float | None = None
    first_conv_input_ciphertexts: int | None = None
    classifier_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, in the order the figures are measured."""
        d = _omit_none(self)
        order = ["poly_degree", "galois_keygen_s", "first_conv_act_s", "first_conv_input_ciphertexts",
                 "classifier_features", "classifier_s"]
        return {k: d[k] for k in order if k in d}


@dataclass(frozen=True)
class BenchReport:
    """One model's encrypted classification timed per layer (medians of ``runs``), and the baseline's ratios."""

    size: int
    workers: int
    runs: int
    server_s_median: float
    end_to_end_s_median: float
    upload_bytes: int
    download_bytes: int
    eval_key_bytes: int
    max_abs_logit_err: float
    max_abs_logit: float
    compile_s: float
    keygen_s: float
    server_startup_s: float
    poly_degree: int
    depth: int
    layers: tuple[LayerRow, ...]
    tenseal_baseline: TensealBaseline | None = None
    ratio_first_conv_act: float | None = None
    ratio_classifier: float | None = None

    def __post_init__(self) -> None:
        if self.runs < 1 or not self.layers:
            raise ValueError(f"`runs` must be ≥ 1 and `layers` non-empty, got {self.runs} and {len(self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (figures not measured are left out)."""
        return _omit_none(self)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-layer table."""
        return {k: v for k, v in self.to_dict().items() if k != "layers"}


def _model(size: int, model_path: Path | None) -> torch.nn.Module:
    if model_path is not None:
        return load_checkpoint(model_path).model.eval()
    if size not in ARCHS:
        raise HEError(f"--size must be one of {sorted(ARCHS)} (or pass --model), got {size}")
    return build_model(ARCHS[size], seed=0).eval()


def tenseal_baseline(net: Network, image: Array, *, poly_degree: int = 16384) -> TensealBaseline:
    """Seconds of the layers TenSEAL's high-level API can run on ``net`` (folded; see the module docstring)."""
    conv = net.ops[0]
    act = net.ops[1] if len(net.ops) > 1 and isinstance(net.ops[1], Act) else None
    s = net.transform.unshuffle
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_degree, coeff_mod_bit_sizes=[60, 40, 40, 40, 60])
    ctx.global_scale = 2.0**40
    t0 = time.perf_counter()
    ctx.generate_galois_keys()
    galois_keygen_s = time.perf_counter() - t0
    first_conv_act_s: float | None = None
    n_ct: int | None = None
    x = (image[0] - net.transform.mean) / net.transform.std
    if s > 1 and isinstance(conv, Conv):
        side = x.shape[0] // s
        k = conv.weight.reshape(conv.weight.shape[0], s, s)  # unshuffle order: (channel, row, col)
        rows_per_chunk = max(1, (poly_degree // 2) // (side * s * s))
        t0 = time.perf_counter()
        n_ct = 0
        for r in range(0, side, rows_per_chunk):
            chunk = x[r * s:(r + rows_per_chunk) * s]
            enc, windows = ts.im2col_encoding(ctx, chunk.tolist(), s, s, s)
            n_ct += 1
            for oc in range(k.shape[0]):
                y = enc.conv2d_im2col(k[oc].tolist(), windows) + float(conv.bias[oc])
                if act is not None:
                    y.polyval([float(c) for c in act.coef[:, oc]])
        first_conv_act_s = time.perf_counter() - t0
    w4 = net.dense.weight  # (K, C, H, W); an average pool folded into it is taken back out to fit the slots
    while int(np.prod(w4.shape[1:])) > poly_degree // 2 and w4.shape[2] % 2 == 0 and w4.shape[3] % 2 == 0:
        k4, c, h, wd = w4.shape
        w4 = w4.reshape(k4, c, h // 2, 2, wd // 2, 2).sum(axis=(3, 5))
    feats = int(np.prod(w4.shape[1:]))
    w = w4.reshape(w4.shape[0], feats)
    classifier_s: float | None = None
    if feats <= poly_degree // 2:
        v = ts.ckks_vector(ctx, np.random.default_rng(0).uniform(-1, 1, feats).tolist())
        t0 = time.perf_counter()
        _ = v.mm(w.T.tolist()) + net.dense.bias.tolist()
        classifier_s = time.perf_counter() - t0
    return TensealBaseline(poly_degree, galois_keygen_s, feats, first_conv_act_s, n_ct, classifier_s)


def run_bench(*, size: int, model_path: Path | None = None, runs: int = 3, workers: int = 2, baseline: bool = True,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    """Compile, keygen, ``runs`` encrypted classifications of one image; per-layer medians and ratios."""
    say = progress or (lambda _m: None)
    model = _model(size, model_path)
    net = fold(trace(model))
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, net.image_shape)
    t0 = time.perf_counter()
    compiled = compile_model(net, calibration=rng.uniform(0, 1, (4, *net.image_shape)))
    compile_s = time.perf_counter() - t0
    say(f"compiled {size}×{size}: N={compiled.params.poly_degree}, depth {compiled.depth}, "
        f"{compiled.plan.n_inputs} input ciphertexts, {len(compiled.plan.masks)} masks ({compile_s:.1f} s)")
    measured = measure(compiled, model, np.repeat(image[None], runs, axis=0), workers=workers, say=say)
    run, ref = measured.run, measured.reference[0]
    last = run.trips[-1]
    layers = layer_table([t.layers for t in run.trips], compiled)
    base = ratio_first = ratio_classifier = None
    if baseline:
        say("TenSEAL high-level API baseline on the layers it can express …")
        base = tenseal_baseline(net, image)
        ours = {r.layer: r.seconds_median for r in layers}
        names = [span.name for span in compiled.plan.layers]
        if base.first_conv_act_s is not None and len(names) > 1:
            ratio_first = base.first_conv_act_s / (ours[names[0]] + ours[names[1]])
        if base.classifier_s is not None:
            ratio_classifier = base.classifier_s / ours[names[-1]]
    return BenchReport(
        size=size, workers=workers, runs=runs,
        server_s_median=statistics.median(t.server_seconds for t in run.trips),
        end_to_end_s_median=statistics.median(t.seconds for t in run.trips),
        upload_bytes=last.upload_bytes, download_bytes=last.download_bytes,
        eval_key_bytes=len(measured.keys.public_bytes()),
        max_abs_logit_err=float(np.abs(last.logits - ref).max()), max_abs_logit=float(np.abs(ref).max()),
        compile_s=compile_s, keygen_s=measured.keygen_seconds, server_startup_s=run.startup_seconds,
        poly_degree=compiled.params.poly_degree, depth=compiled.depth, layers=layers, tenseal_baseline=base,
        ratio_first_conv_act=ratio_first, ratio_classifier=ratio_classifier)
