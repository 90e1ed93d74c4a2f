"""Pass 6, cost: what a plan costs, per layer and per instruction (pure; figures from the CKKS cost notes).

The unit is one plaintext multiplication at the top level. A rotation (key switch) costs
:data:`ROTATION_COST` of them, so the lowering pass judges its giant steps by the rotation
count; the worker pool's scheduler divides a layer's work by :func:`instr_cost` (SEAL's work
falls linearly with the primes left) and charges :data:`TRANSFER_COST` per ciphertext it
ships between workers. The figures are SEAL's measured on a 2-core CPU (tenseal 0.3.18,
N = 16384, top level): ``multiply_plain`` ~1 ms, ``add`` ~0.4 ms, ``rotate_vector`` ~20 ms,
``square`` + ``relinearize`` ~26 ms; costs fall roughly linearly with the level.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from he_inference.passes.program import Kind, Plan

__all__ = ["ROTATION_COST", "TRANSFER_COST", "LayerKind", "LayerStats", "instr_cost", "layer_stats"]

ROTATION_COST = 20.0   # one key switch ~ 20 plaintext multiply-adds
TRANSFER_COST = 12.0   # save (compressing) + load of one ciphertext
_COST = {Kind.ROT: ROTATION_COST, Kind.SQUARE: 26.0, Kind.MUL: 26.0, Kind.ADD_PLAIN: 0.4}


@dataclass(frozen=True)
class LayerStats:
    """What a layer costs: counts of each instruction kind and its levels."""

    name: str
    kind: LayerKind
    rotations: int
    plain_mults: int
    ct_mults: int
    levels: int

    def __post_init__(self) -> None:
        if min(self.rotations, self.plain_mults, self.ct_mults, self.levels) < 0:
            raise ValueError(f"{self.name}: `rotations`, `plain_mults`, `ct_mults` and `levels` must be ≥ 0")


class LayerKind(enum.StrEnum):
    """What a layer does under encryption: the kind of its :class:`LayerStats`."""

    LINEAR = "linear"
    ACTIVATION = "activation"
    POOL = "pool"


def layer_stats(plan: Plan, depths: Sequence[int]) -> tuple[LayerStats, ...]:
    """Counts and levels of every layer; ``depths`` are the registers' (:func:`~.levels.register_depths`)."""
    out = []
    for name, start, end in plan.layers:
        ins = plan.instrs[start:end]
        kinds = {i.kind for i in ins}
        kind = (LayerKind.LINEAR if Kind.MULACC in kinds
                else LayerKind.ACTIVATION if kinds & {Kind.SQUARE, Kind.MUL} else LayerKind.POOL)
        levels = (max((depths[i.dst] for i in ins), default=0)
                  - min((depths[s] for i in ins for s in i.srcs), default=0))
        out.append(LayerStats(name, kind, sum(i.kind is Kind.ROT for i in ins),
                              sum(len(i.masks) for i in ins if i.kind is Kind.MULACC),
                              sum(i.kind in (Kind.SQUARE, Kind.MUL) for i in ins), levels))
    return tuple(out)


def instr_cost(plan: Plan, idx: int, level: int, top: int, *, switches: int = 1) -> float:
    """Estimated cost of instruction ``idx`` at ``level`` of a chain whose top level is ``top``.

    ``switches``: the key switches of a rotation (more than one when its step has no key of
    its own: :func:`~.rotkeys.step_switches`).
    """
    ins = plan.instrs[idx]
    if ins.kind is Kind.ROT:
        base = ROTATION_COST * switches
    elif ins.kind is Kind.MULACC:
        base = 1.4 * len(ins.srcs) + 4.0
    elif ins.kind is Kind.ADD:
        base = 0.4 * (len(ins.srcs) - 1)
    else:
        base = _COST[ins.kind]
    return base * (level + 2) / (top + 2)
