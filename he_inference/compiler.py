"""``compile_model``: a PyTorch Approx-CNN to a saved, self-contained CKKS inference plan.

The passes of :mod:`he_inference.passes`, in order: trace and fold the model, check the
value ranges on calibration images (interpret) against the CKKS headroom, choose the
packing (layout) and write the instructions (lower) for the smallest ring whose slots hold
a channel, pick the smallest 128-bit-secure ring for the plan's depth
(:mod:`he_inference.ckks`), then derive the level assignment and the per-layer costs (levels,
cost). :func:`compile_checkpoint` does the same for a saved privrad checkpoint, and is the
one path the CLI, the checks and the demo compile through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from federation.errors import DepthError, HEError
from federation.storage import Checkpoint, load_checkpoint
from he_inference.artifact import CompiledModel, MetaKey
from he_inference.ckks import MAX_BITS, choose_params
from he_inference.images import load_images
from he_inference.passes.fold import fold
from he_inference.passes.interpret import value_ranges
from he_inference.passes.ir import Array, Network, Shape
from he_inference.passes.layout import choose_packing
from he_inference.passes.levels import plan_depth
from he_inference.passes.lower import lower, zero_threshold
from he_inference.passes.rotkeys import choose_key_steps
from he_inference.passes.trace import trace

__all__ = ["Calibration", "CompileOptions", "CompiledCheckpoint", "compile_checkpoint", "compile_model",
           "load_calibration"]

UNIFORM_NOISE = "uniform noise"   # what the calibration is, when no images are given


@dataclass(frozen=True)
class Calibration:
    """Images (N, C, H, W) in [0, 1] that bound every layer's values, and what they are (said in the artifact)."""

    images: Array
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) == 0:
            raise ValueError(f"`images` must be a non-empty (N, C, H, W) batch, got shape {self.images.shape}")


def load_calibration(folder: Path, *, meta: dict[str, Any], n: int, private: bool = False) -> Calibration:
    """The first ``n`` images of a labelled folder, read as the checkpoint with ``meta`` was trained.

    ``private``: they are a site's own images (the artifact says so); default: public ones.
    """
    images = load_images(folder, meta=meta).images[:n]
    return Calibration(images, f"{'private' if private else 'public'}: {len(images)} images")


@dataclass(frozen=True)
class CompileOptions:
    """CKKS precision choices: the scale Δ = 2^scale_bits and integer headroom at the last level."""

    scale_bits: int = 40
    headroom_bits: int = 20
    range_margin: float = 4.0   # calibrated values may grow this much on unseen images
    max_rotation_keys: int | None = None   # Galois keys the client makes (None: one per step, the fastest)

    def __post_init__(self) -> None:
        if self.scale_bits < 1 or self.headroom_bits < 1:
            raise ValueError(f"`scale_bits` and `headroom_bits` must be ≥ 1, got {self.scale_bits} and "
                             f"{self.headroom_bits}")
        if not self.range_margin >= 1.0:
            raise ValueError(f"`range_margin` must be ≥ 1, got {self.range_margin}")
        if self.max_rotation_keys is not None and self.max_rotation_keys < 1:
            raise ValueError(f"`max_rotation_keys` must be ≥ 1, got {self.max_rotation_keys}")


def compile_model(model: nn.Module | Network, *, options: CompileOptions | None = None,
                  calibration: Array | None = None, image_shape: Shape | None = None,
                  meta: dict[str, Any] | None = None) -> CompiledModel:
    """Compile ``model`` (not modified) for encrypted inference.

    ``model`` may also be a traced :class:`~he_inference.passes.ir.Network` (folded or not).
    ``calibration`` (N, C, H, W in [0, 1]) bounds the values every layer sees; default:
    uniform noise images.

    Raises
    ------
    UnsupportedLayerError
        A layer has no CKKS equivalent (named).
    DepthError
        The network is deeper than any 128-bit ring allows (depth needed vs available).
    HEError
        Calibrated values would overflow the CKKS headroom, or ``max_rotation_keys`` is below
        the fewest Galois keys the plan's rotations can be composed from.
    """
    options = options or CompileOptions()
    net = fold(model if isinstance(model, Network) else trace(model, image_shape=image_shape))
    ranges = value_ranges(net, calibration)  # op inputs, classifier input, logits
    worst = max(ranges) * options.range_margin
    limit = 2.0 ** (options.headroom_bits - 1)
    if worst >= limit:
        at = int(np.argmax(ranges))
        name = net.ops[at].name if at < len(net.ops) else net.dense.name
        raise HEError(f"values reach {max(ranges):.3g} at {name} on the calibration images; with margin "
                      f"{options.range_margin} that exceeds the CKKS headroom 2^{options.headroom_bits - 1}: "
                      "raise headroom_bits or lower scale_bits")
    last: DepthError | None = None
    for n in MAX_BITS:  # smallest ring first; a deeper or wider network moves up
        try:
            packing = choose_packing(net, slots=n // 2)
        except DepthError as exc:  # a channel does not fit in n/2 slots
            last = exc
            continue
        plan = lower(net, packing=packing, ranges=ranges, zero_below=zero_threshold(n, options.scale_bits))
        params = choose_params(plan_depth(plan), min_slots=n // 2, scale_bits=options.scale_bits,
                               headroom_bits=options.headroom_bits)
        if params.slots == n // 2:
            try:
                key_steps = choose_key_steps(plan, options.max_rotation_keys)
            except ValueError as exc:
                raise HEError(f"max_rotation_keys: {exc}") from exc
            return CompiledModel.assemble(params, plan, image_shape=net.image_shape, transform=net.transform,
                                          classes=net.classes, calibrated_max=max(ranges), meta=meta,
                                          key_steps=key_steps)
    assert last is not None
    raise last


@dataclass(frozen=True)
class CompiledCheckpoint:
    """A checkpoint and what it compiled to."""

    checkpoint: Checkpoint
    compiled: CompiledModel

    @property
    def torch_model(self) -> nn.Module:
        """The checkpoint's model, in eval mode (the plaintext reference)."""
        return self.checkpoint.model.eval()


def compile_checkpoint(model_path: Path, *, checkpoint: Checkpoint | None = None,
                       calibration: Calibration | None = None,
                       options: CompileOptions | None = None) -> CompiledCheckpoint:
    """Compile the privrad checkpoint at ``model_path``; the artifact carries the client's preprocessing.

    ``checkpoint``: that file, already loaded (it is then not read again). The artifact's
    ``meta["calibration"]`` says what the value ranges were measured on (``model.he`` goes to
    the server, and the ranges are statistics of those images): ``calibration.source``, or
    uniform noise.
    """
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(model_path)
    net = trace(ckpt.model.eval(), classes=tuple(ckpt.meta["classes"]))
    meta: dict[str, Any] = {
        MetaKey.PREPROCESS: ckpt.meta.get("preprocess", {}),
        MetaKey.SOURCE: str(model_path),
        MetaKey.SOURCE_SHA256: ckpt.sha256,
        MetaKey.CALIBRATION: calibration.source if calibration is not None else UNIFORM_NOISE,
        MetaKey.PRIVACY: ckpt.meta.get("privacy", {}),
    }
    images = None if calibration is None else calibration.images
    return CompiledCheckpoint(ckpt, compile_model(net, options=options, calibration=images, meta=meta))
