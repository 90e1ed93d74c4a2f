"""Pass 5, levels: the one level and scale assignment of a plan, used by every engine (pure).

Every masked product, square and ciphertext product is followed by a rescale, which drops
the last prime of the chain: a register's *depth* is the number of rescales behind it, and
the plan's depth the most behind any output. Given the ring's primes, :func:`assign_levels`
fixes the level (chain index counted from the bottom) every instruction works at and the
level and scale every plaintext is encoded at. Scale discipline: a masked product's mask is
encoded at ``q_l * Δ / scale(src)`` so that the rescale that follows lands exactly on Δ;
squares and ciphertext products are tracked as they drift. The single-process engine and
every worker of the pool encode and evaluate with this one assignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from federation.errors import CiphertextError
from he_inference.passes.program import RESCALING, Kind, Plan

__all__ = ["LevelAssignment", "assign_levels", "plan_depth", "register_depths"]


def register_depths(plan: Plan) -> tuple[int, ...]:
    """Rescales behind each register (inputs: 0)."""
    depth = [0] * plan.n_registers
    for ins in plan.instrs:
        depth[ins.dst] = max(depth[s] for s in ins.srcs) + (ins.kind in RESCALING)
    return tuple(depth)


def plan_depth(plan: Plan) -> int:
    """The multiplicative depth the ring must provide: the most rescales behind any output."""
    depth = register_depths(plan)
    return max(depth[r] for r in plan.outputs)


@dataclass(frozen=True)
class LevelAssignment:
    """Where every instruction works and every plaintext is encoded, for one ring.

    ``primes``: the chain it was made for (data primes, bottom first; fresh ciphertexts are
    at level ``top = len(primes) - 1``). ``operand_level[i]``: the level instruction ``i``'s
    operands are brought to (chain index from the bottom). ``mask_at[i][k]``: (level, scale)
    of the plaintext of instruction ``i``'s ``k``-th mask. ``output_scales``: the scale of
    each output register. ``depth``: the most levels any output has used.
    """

    primes: tuple[int, ...]
    operand_level: tuple[int, ...]
    mask_at: tuple[tuple[tuple[int, float], ...], ...]
    output_scales: tuple[float, ...]
    depth: int

    @property
    def top(self) -> int:
        """Level of fresh ciphertexts."""
        return len(self.primes) - 1

    def __post_init__(self) -> None:
        if len(self.mask_at) != len(self.operand_level):
            raise ValueError(f"`mask_at` ({len(self.mask_at)}) and `operand_level` ({len(self.operand_level)}) "
                             "must give one entry per instruction")
        if any(not 0 <= lv <= self.top for lv in self.operand_level):
            raise ValueError(f"`operand_level` must lie in 0 .. `top` ({self.top})")


def assign_levels(plan: Plan, *, primes: Sequence[int], scale: float) -> LevelAssignment:
    """Levels and scales of ``plan`` on the chain ``primes`` (data primes, bottom first) at scale ``scale``.

    Raises
    ------
    CiphertextError
        The plan needs more levels than the chain has.
    """
    top = len(primes) - 1
    level = dict.fromkeys(range(plan.n_inputs), top)
    sc = dict.fromkeys(range(plan.n_inputs), scale)
    operand: list[int] = []
    mask_at: list[tuple[tuple[int, float], ...]] = []
    for ins in plan.instrs:
        lv = min(level[s] for s in ins.srcs)
        q = float(primes[lv])
        src = sc[ins.srcs[0]]
        at: tuple[tuple[int, float], ...] = ()
        if ins.kind is Kind.MULACC:
            at = tuple((lv, q * scale / sc[s]) for s in ins.srcs)
            level[ins.dst], sc[ins.dst] = lv - 1, scale
        elif ins.kind is Kind.ADD_PLAIN:
            at = ((lv, src),)
            level[ins.dst], sc[ins.dst] = lv, src
        elif ins.kind in (Kind.ROT, Kind.ADD):
            level[ins.dst], sc[ins.dst] = lv, src
        elif ins.kind is Kind.SQUARE:
            level[ins.dst], sc[ins.dst] = lv - 1, src**2 / q
        else:
            a, b = ins.srcs
            level[ins.dst], sc[ins.dst] = lv - 1, sc[a] * sc[b] / q
        if level[ins.dst] < 0:
            raise CiphertextError(f"plan needs more levels than the {top + 1}-prime chain provides")
        operand.append(lv)
        mask_at.append(at)
    return LevelAssignment(tuple(int(p) for p in primes), tuple(operand), tuple(mask_at),
                           tuple(sc[r] for r in plan.outputs), top - min(level[r] for r in plan.outputs))
