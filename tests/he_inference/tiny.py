"""A tiny compiled model on a tiny ring (N = 8192, three levels): the pool's robustness tests start many workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from federation.model import PolyAct
from he_inference.artifact import CompiledModel
from he_inference.ckks import CKKSParams
from he_inference.keys import SecretKeys
from he_inference.passes.fold import fold
from he_inference.passes.interpret import value_ranges
from he_inference.passes.layout import choose_packing
from he_inference.passes.lower import lower
from he_inference.passes.trace import trace
from tests.he_inference.conftest import Compiled
from tests.he_inference.models import seeded

TINY = CKKSParams(8192, (50, 35, 35, 35, 50), 35)   # 205 bits: three levels, 128-bit secure at N = 8192
TINY_SHAPE = (1, 8, 8)
TINY_HE_ATOL = 5e-4   # CKKS error at a 35-bit scale is absolute (tests/he_inference/passes/test_levels.py)


def tiny_compiled(directory: Path) -> Compiled:
    """Conv → PolyAct → Linear on 8x8 (three layers), saved to ``directory`` and reloaded, with fresh keys."""
    torch_model = seeded(4, lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2),
                                                  nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval())
    net = fold(trace(torch_model, image_shape=TINY_SHAPE))
    x = np.random.default_rng(0).uniform(0, 1, (2, *TINY_SHAPE))
    plan = lower(net, packing=choose_packing(net, slots=TINY.slots), ranges=value_ranges(net, x))
    model = CompiledModel.assemble(TINY, plan, image_shape=TINY_SHAPE, transform=net.transform, classes=("a", "b"),
                                   calibrated_max=max(value_ranges(net, x)))
    path = directory / "tiny.he"
    model.save(path)
    return Compiled(net, x, CompiledModel.load(path), path, SecretKeys.generate(model.params, model.plan.steps))
