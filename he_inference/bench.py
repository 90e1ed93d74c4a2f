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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from federation.errors import HEError
from federation.model import ArchConfig, HeadKind, build_model
from he_inference.check import layer_table, round_trips
from he_inference.compiler import compile_model
from he_inference.ir import Act, Conv, Network, trace
from he_inference.keys import SecretKeys

__all__ = ["ARCHS", "run_bench", "tenseal_baseline"]

Array = npt.NDArray[np.float64]

# The built-in Approx-CNNs per image side: three conv stages of depth 2 each + the head = depth 7.
ARCHS = {
    64: ArchConfig(input_size=64, channels=(16, 32, 64), head=HeadKind.FLATTEN),
    256: ArchConfig(input_size=256, channels=(16, 32, 64), head=HeadKind.FLATTEN, stem=4),
}


def _model(size: int, model_path: Path | None) -> torch.nn.Module:
    if model_path is not None:
        from federation.storage import load_checkpoint
        return load_checkpoint(model_path).model.eval()
    if size not in ARCHS:
        raise HEError(f"--size must be one of {sorted(ARCHS)} (or pass --model), got {size}")
    return build_model(ARCHS[size], seed=0).eval()


def tenseal_baseline(net: Network, image: Array, *, poly_degree: int = 16384) -> dict[str, Any]:
    """Seconds of the layers TenSEAL's high-level API can run (see the module docstring)."""
    import tenseal as ts

    conv = net.ops[0]
    act = net.ops[1] if len(net.ops) > 1 and isinstance(net.ops[1], Act) else None
    s = net.transform.unshuffle
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_degree, coeff_mod_bit_sizes=[60, 40, 40, 40, 60])
    ctx.global_scale = 2.0**40
    t0 = time.perf_counter()
    ctx.generate_galois_keys()
    out: dict[str, Any] = {"poly_degree": poly_degree, "galois_keygen_s": time.perf_counter() - t0}
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
        out["first_conv_act_s"] = time.perf_counter() - t0
        out["first_conv_input_ciphertexts"] = n_ct
    w4 = net.dense.weight  # (K, C, H, W); an average pool folded into it is taken back out to fit the slots
    while int(np.prod(w4.shape[1:])) > poly_degree // 2 and w4.shape[2] % 2 == 0 and w4.shape[3] % 2 == 0:
        k, c, h, wd = w4.shape
        w4 = w4.reshape(k, c, h // 2, 2, wd // 2, 2).sum(axis=(3, 5))
    feats = int(np.prod(w4.shape[1:]))
    w = w4.reshape(w4.shape[0], feats)
    out["classifier_features"] = feats
    if feats <= poly_degree // 2:
        v = ts.ckks_vector(ctx, np.random.default_rng(0).uniform(-1, 1, feats).tolist())
        t0 = time.perf_counter()
        _ = v.mm(w.T.tolist()) + net.dense.bias.tolist()
        out["classifier_s"] = time.perf_counter() - t0
    return out


def run_bench(*, size: int, model_path: Path | None = None, runs: int = 3, workers: int = 2, baseline: bool = True,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compile, keygen, ``runs`` encrypted classifications of one image; per-layer medians and ratios."""
    say = progress or (lambda _m: None)
    model = _model(size, model_path)
    net = trace(model)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, net.image_shape)
    t0 = time.perf_counter()
    compiled = compile_model(net, calibration=rng.uniform(0, 1, (4, *net.image_shape)))
    compile_s = time.perf_counter() - t0
    say(f"compiled {size}×{size}: N={compiled.params.poly_degree}, depth {compiled.plan.depth}, "
        f"{compiled.plan.n_inputs} input ciphertexts, {len(compiled.plan.masks)} masks ({compile_s:.1f} s)")
    t0 = time.perf_counter()
    keys = SecretKeys.generate(compiled.params, compiled.plan.steps)
    keygen_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(torch.as_tensor(image[None], dtype=torch.float32)).double().numpy()[0]
    trips, startup_s = round_trips(compiled, keys, np.repeat(image[None], runs, axis=0), workers=workers, say=say)
    last = trips[-1]
    report: dict[str, Any] = {
        "size": size, "workers": workers, "runs": runs,
        "server_s_median": statistics.median(t.server_seconds for t in trips),
        "end_to_end_s_median": statistics.median(t.seconds for t in trips),
        "upload_bytes": last.upload_bytes, "download_bytes": last.download_bytes,
        "eval_key_bytes": len(keys.public_bytes()),
        "max_abs_logit_err": float(np.abs(last.logits - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
        "compile_s": compile_s, "keygen_s": keygen_s, "server_startup_s": startup_s,
        "poly_degree": compiled.params.poly_degree, "depth": compiled.plan.depth,
        "layers": layer_table([t.layers for t in trips]),
    }
    if baseline:
        say("TenSEAL high-level API baseline on the layers it can express …")
        base = tenseal_baseline(net, image)
        report["tenseal_baseline"] = base
        ours = {r["layer"]: r["seconds_median"] for r in report["layers"]}
        names = [name for name, _, _ in compiled.plan.layers]
        if "first_conv_act_s" in base and len(names) > 1:
            mine = ours[names[0]] + ours[names[1]]
            report["ratio_first_conv_act"] = base["first_conv_act_s"] / mine
        if "classifier_s" in base:
            report["ratio_classifier"] = base["classifier_s"] / ours[names[-1]]
    return report
