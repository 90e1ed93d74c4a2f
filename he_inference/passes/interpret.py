"""Pass 7, interpret: run a network or a plan in plaintext (pure numpy / torch float64).

:func:`run_plain` evaluates a :class:`~.ir.Network` (folded or not): the reference every
encrypted result is checked against. :func:`value_ranges` measures what every layer sees on
calibration images (the compiler's headroom check and the activations' basis choice).
:class:`SlotSimulator` executes a :class:`~.program.Plan` on numpy slot vectors, exactly as
the engine does on ciphertexts, but without noise: for tests and the schedule's checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from he_inference.passes.ir import Act, Array, AvgPool, Conv, Dense, Network, Norm, Op
from he_inference.passes.program import Kind, Plan

__all__ = ["SlotSimulator", "dense_logits", "run_ops", "run_plain", "value_ranges"]


def run_ops(ops: Sequence[Op], x: torch.Tensor) -> torch.Tensor:
    """Evaluate ``ops`` on a float64 batch (N, C, H, W) in plaintext."""
    f = torch.nn.functional
    for op in ops:
        if isinstance(op, Conv):
            x = f.conv2d(x, torch.from_numpy(op.weight), torch.from_numpy(op.bias), op.stride, op.padding)
        elif isinstance(op, AvgPool):
            x = f.avg_pool2d(x, op.kernel)
        elif isinstance(op, Norm):
            x = ((x - torch.from_numpy(op.mean)[:, None, None]) * torch.from_numpy(op.scale)[:, None, None]
                 + torch.from_numpy(op.shift)[:, None, None])
        elif isinstance(op, Act):
            c = torch.from_numpy(op.coef)[:, None, :, None, None]
            x = sum((c[k] * x**k for k in range(op.degree + 1)), torch.zeros_like(x))
        else:
            x = x + run_ops(op.body, x)
    return x


def dense_logits(dense: Dense, x: torch.Tensor) -> torch.Tensor:
    """The classifier on a batch of feature maps."""
    w = torch.from_numpy(dense.weight)
    c, h, wd = w.shape[1:]
    return x[:, :c, :h, :wd].flatten(1) @ w.flatten(1).T + torch.from_numpy(dense.bias)


def run_plain(net: Network, images: Array) -> Array:
    """Logits of ``images`` (N, C, H, W in [0, 1]) through ``net`` in float64."""
    x = run_ops(net.ops, torch.from_numpy(net.transform.apply(images)))
    return dense_logits(net.dense, x).numpy()


def value_ranges(net: Network, calibration: Array | None = None) -> list[float]:
    """Max |value| entering each top-level op, then entering the classifier, then of the logits.

    ``calibration``: images (N, C, H, W) in [0, 1]; default: uniform noise images.
    """
    if calibration is None:
        calibration = np.random.default_rng(0).uniform(0, 1, (8, *net.image_shape))
    x = torch.from_numpy(net.transform.apply(calibration))
    out = []
    for op in net.ops:
        out.append(float(x.abs().max()))
        x = run_ops([op], x)
    out.append(float(x.abs().max()))
    out.append(float(dense_logits(net.dense, x).abs().max()))
    return out


class SlotSimulator:
    """Runs a plan on plain numpy slot vectors: exact arithmetic, for tests and cost counts."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def apply(self, idx: int, regs: dict[int, Array]) -> None:
        """Execute instruction ``idx`` on ``regs`` in place."""
        ins = self.plan.instrs[idx]
        a = [regs[s] for s in ins.srcs]
        if ins.kind is Kind.ROT:
            v = np.roll(a[0], -ins.step)
        elif ins.kind is Kind.MULACC:
            v = sum((s * self.plan.masks[m] for s, m in zip(a, ins.masks, strict=True)), np.zeros(self.plan.slots))
        elif ins.kind is Kind.ADD:
            v = np.sum(a, axis=0)
        elif ins.kind is Kind.ADD_PLAIN:
            v = a[0] + self.plan.masks[ins.masks[0]]
        elif ins.kind is Kind.SQUARE:
            v = a[0] * a[0]
        else:
            v = a[0] * a[1]
        regs[ins.dst] = v

    def run(self, inputs: Sequence[Array]) -> Array:
        """Logits from packed input vectors."""
        regs: dict[int, Array] = dict(enumerate(inputs))
        free = self.plan.free_after()
        for idx in range(len(self.plan.instrs)):
            self.apply(idx, regs)
            for r in free.get(idx, []):
                regs.pop(r, None)
        return np.array([regs[r][0] for r in self.plan.outputs])
