"""The rotation-key pass: a key budget keeps every rotation possible and costs the fewest key switches it can."""

from __future__ import annotations

import itertools

import pytest

from he_inference.passes.fold import fold
from he_inference.passes.interpret import value_ranges
from he_inference.passes.layout import choose_packing
from he_inference.passes.lower import lower
from he_inference.passes.program import Kind, Plan
from he_inference.passes.rotkeys import choose_key_steps, key_switches_per_pass, layer_key_switches, naf, step_switches
from he_inference.passes.trace import trace
from tests.he_inference.models import CASES, images

SLOTS = 8192


def _plan(n: int) -> Plan:
    make, shape = CASES[n].values
    net = fold(trace(make(), image_shape=shape))
    return lower(net, packing=choose_packing(net, slots=SLOTS), ranges=value_ranges(net, images(shape)))


def test_naf_is_a_signed_sum_of_non_adjacent_powers_of_two() -> None:
    for v in range(-3000, 3000):
        terms = naf(v)
        exps = sorted(abs(t).bit_length() - 1 for t in terms)
        assert sum(terms) == v
        assert all(abs(t) & (abs(t) - 1) == 0 for t in terms)
        assert all(b - a >= 2 for a, b in itertools.pairwise(exps))   # non-adjacent: SEAL's minimal form


@pytest.mark.parametrize("case", [0, 2, 4])
def test_a_smaller_key_budget_never_costs_fewer_switches_and_always_composes_every_step(case: int) -> None:
    plan = _plan(case)
    rotations = sum(1 for i in plan.instrs if i.kind is Kind.ROT)
    full = choose_key_steps(plan, None)
    assert full == plan.steps
    assert key_switches_per_pass(plan, full) == rotations
    costs, refusal = [], None
    for budget in range(len(plan.steps), 0, -1):
        try:
            keys = choose_key_steps(plan, budget)
        except ValueError as exc:
            refusal = exc
            break
        assert len(keys) <= budget
        assert all(step_switches(s, keys, plan.slots) is not None for s in plan.steps)
        costs.append(key_switches_per_pass(plan, keys))
    assert costs == sorted(costs)               # fewer keys: never fewer key switches
    assert costs[0] == rotations
    assert len(costs) > 1
    assert refusal is not None                  # down to the fewest keys the NAF terms allow, then refused
    assert "need at least" in str(refusal)


def test_a_budget_below_the_naf_terms_is_refused_with_the_minimum() -> None:
    plan = _plan(0)
    with pytest.raises(ValueError, match=r"need at least \d+ Galois keys .* 1 allowed"):
        choose_key_steps(plan, 1)


def test_per_layer_key_switches_add_up_to_the_pass_and_its_relinearisations() -> None:
    plan = _plan(2)
    products = sum(1 for i in plan.instrs if i.kind in (Kind.SQUARE, Kind.MUL))
    for budget in (None, len(plan.steps) - 2):
        keys = choose_key_steps(plan, budget)
        per_layer = layer_key_switches(plan, keys)
        assert len(per_layer) == len(plan.layers)
        assert sum(per_layer) == key_switches_per_pass(plan, keys) + products
