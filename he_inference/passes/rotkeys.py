"""Pass 7, rotation keys: which rotation steps get a Galois key of their own (pure).

A Galois key costs the same bytes whatever its step (~7.8 MB each at N = 16384, seeded;
``../shared/notes/ckks-costs.md``). SEAL rotates by a step without its own key through the
terms of the step's non-adjacent form (NAF), each of which needs a key: one key switch per
term instead of one in all. So a plan's steps can share a small key set at the price of
extra key switches; :func:`choose_key_steps` picks the set under a budget that costs the
fewest key switches per forward pass (greedy: the NAF terms every keyless step needs, then
own keys for the steps that save the most switches), and :func:`key_switches_per_pass`
counts what a set costs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from he_inference.passes.program import Kind, Plan

__all__ = ["choose_key_steps", "key_switches_per_pass", "layer_key_switches", "naf", "step_switches"]


def naf(value: int) -> list[int]:
    """The non-adjacent form of ``value`` as SEAL computes it (``util/numth.h``): signed powers of two, low first."""
    out, sign, v, i = [], -1 if value < 0 else 1, abs(value), 0
    while v:
        z = 2 - (v & 3) if v & 1 else 0
        v = (v - z) >> 1
        if z:
            out.append(sign * z * (1 << i))
        i += 1
    return out


def _terms(step: int, slots: int) -> list[int]:
    """The NAF terms SEAL rotates by for ``step`` without its own key (a term of ``slots`` is the identity)."""
    return [t for t in naf(step) if abs(t) != slots]


def step_switches(step: int, key_steps: Collection[int], slots: int) -> int | None:
    """Key switches of one rotation by ``step`` with keys for ``key_steps``; None: SEAL cannot do it."""
    have = {k % slots for k in key_steps}
    if step % slots == 0:
        return 0
    if step % slots in have:
        return 1
    terms = _terms(step, slots)
    if len(naf(step)) == 1 or any(t % slots not in have for t in terms):
        return None
    return len(terms)


def _uses(plan: Plan) -> Counter[int]:
    return Counter(i.step for i in plan.instrs if i.kind is Kind.ROT)


def key_switches_per_pass(plan: Plan, key_steps: Collection[int]) -> int:
    """Key switches one forward pass of ``plan`` spends with keys for ``key_steps``.

    Raises
    ------
    ValueError
        A step of the plan cannot be composed from ``key_steps``.
    """
    total = 0
    for step, n in _uses(plan).items():
        k = step_switches(step, key_steps, plan.slots)
        if k is None:
            raise ValueError(f"rotation step {step} cannot be composed from the key steps {sorted(key_steps)}")
        total += n * k
    return total


def layer_key_switches(plan: Plan, key_steps: Collection[int]) -> tuple[int, ...]:
    """Key switches of each layer: its rotations' (through ``key_steps``) and one relinearisation per product."""
    per = {s: step_switches(s, key_steps, plan.slots) for s in plan.steps}
    out = []
    for _, start, end in plan.layers:
        n = 0
        for ins in plan.instrs[start:end]:
            if ins.kind is Kind.ROT:
                k = per[ins.step]
                if k is None:
                    raise ValueError(f"rotation step {ins.step} cannot be composed from the key steps")
                n += k
            elif ins.kind in (Kind.SQUARE, Kind.MUL):
                n += 1
        out.append(n)
    return tuple(out)


def choose_key_steps(plan: Plan, max_keys: int | None) -> tuple[int, ...]:
    """At most ``max_keys`` key steps that perform every rotation of ``plan`` (None: one key per step, the fastest).

    Raises
    ------
    ValueError
        ``max_keys`` is below the fewest keys the plan's steps can be composed from (the message gives it).
    """
    uses, slots = _uses(plan), plan.slots
    if max_keys is None or max_keys >= len(uses):
        return plan.steps
    own: set[int] = set()
    while True:   # the NAF terms the keyless steps need, plus own keys for the best savers while they fit
        keyless = [s for s in uses if s not in own]
        needed = {t for s in keyless for t in _terms(s, slots) if len(naf(s)) > 1} | {s for s in keyless
                                                                                    if len(naf(s)) == 1}
        keys = {k % slots: k for k in sorted(needed | own)}
        room = max_keys - len(keys)
        if room < 0:   # only at the start: an own key is added only with room ≥ 1, and costs at most one
            raise ValueError(f"the plan's {len(uses)} rotation steps need at least {len(keys)} Galois keys "
                             f"(the terms of their non-adjacent forms), {max_keys} allowed")
        savers = sorted((s for s in keyless if s % slots not in keys),
                        key=lambda s: (-uses[s] * (len(_terms(s, slots)) - 1), s))
        if room == 0 or not savers:
            return tuple(sorted(keys.values()))
        own.add(savers[0])
