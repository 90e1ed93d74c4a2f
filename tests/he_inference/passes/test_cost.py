"""The cost pass: per-layer counts checked by counting the instructions directly, and the cost model's shape."""

from __future__ import annotations

from collections import Counter

import numpy as np

from he_inference.passes.cost import ROTATION_COST, LayerKind, instr_cost, layer_stats
from he_inference.passes.fold import fold
from he_inference.passes.interpret import value_ranges
from he_inference.passes.layout import choose_packing
from he_inference.passes.levels import register_depths
from he_inference.passes.lower import lower
from he_inference.passes.program import Kind, Plan
from he_inference.passes.trace import trace
from tests.he_inference.models import custom, images


def _plan() -> Plan:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    return lower(net, packing=choose_packing(net, slots=8192), ranges=value_ranges(net, images((1, 16, 16))))


def test_layer_stats_count_what_each_layer_runs() -> None:
    plan = _plan()

    stats = layer_stats(plan, register_depths(plan))

    assert [s.name for s in stats] == [span.name for span in plan.layers]
    for s, (_, start, end) in zip(stats, plan.layers, strict=True):
        kinds = Counter(i.kind for i in plan.instrs[start:end])
        assert s.rotations == kinds[Kind.ROT]
        assert s.ct_mults == kinds[Kind.SQUARE] + kinds[Kind.MUL]
        assert s.plain_mults == sum(len(i.masks) for i in plan.instrs[start:end] if i.kind is Kind.MULACC)
    assert [s.kind for s in stats] == [LayerKind.LINEAR, LayerKind.ACTIVATION, LayerKind.POOL, LayerKind.LINEAR,
                                       LayerKind.ACTIVATION, LayerKind.LINEAR]
    # the classifier reads terms from before and after the residual (depths 2 to 4) and ends at depth 5
    assert [s.levels for s in stats] == [1, 1, 0, 1, 1, 3]


def test_a_rotation_at_the_top_level_costs_the_rotation_constant_and_less_below() -> None:
    plan = _plan()
    rot = next(n for n, i in enumerate(plan.instrs) if i.kind is Kind.ROT)

    top = instr_cost(plan, rot, 7, 7)
    costs = [instr_cost(plan, rot, level, 7) for level in range(8)]

    assert top == ROTATION_COST
    assert np.all(np.diff(costs) > 0)
