"""The instruction set of an encrypted forward pass and the frozen :class:`Plan` (pure data).

A plan is a straight-line program over numbered registers: registers ``0 .. n_inputs - 1``
are the client's ciphertexts, every :class:`Instr` writes one new register, and
``outputs`` name one register per class (the logit in every slot). Instructions are
grouped into typed :class:`LayerSpan` s, one per layer of the network, in order. The
lowering pass (:mod:`~he_inference.passes.lower`) writes plans; the levels, cost and
interpret passes read them; :mod:`he_inference.engine` runs them on ciphertexts.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from he_inference.passes.ir import Array
from he_inference.passes.layout import Layout

__all__ = ["RESCALING", "Instr", "Kind", "LayerSpan", "Plan"]


class Kind(enum.StrEnum):
    """Instruction kinds; their values also name the operation counts of a layer."""

    ROT = "rot"            # dst = rotate(a, step)
    MULACC = "mulacc"      # dst = rescale(sum_j a_j * mask_j)
    ADD = "add"            # dst = sum a_j
    ADD_PLAIN = "addp"     # dst = a + mask
    SQUARE = "square"      # dst = rescale(relin(a * a))
    MUL = "mul"            # dst = rescale(relin(a * b))


RESCALING = frozenset({Kind.MULACC, Kind.SQUARE, Kind.MUL})   # the kinds that use one level


@dataclass(frozen=True)
class Instr:
    """One instruction: ``dst`` register, operand registers, masks (ids into ``Plan.masks``), a step."""

    kind: Kind
    dst: int
    srcs: tuple[int, ...]
    masks: tuple[int, ...] = ()
    step: int = 0

    def __post_init__(self) -> None:
        if not self.srcs:
            raise ValueError(f"{self.kind} -> r{self.dst}: `srcs` is empty")
        wanted = {Kind.MULACC: len(self.srcs), Kind.ADD_PLAIN: 1}.get(self.kind, 0)
        if len(self.masks) != wanted:
            raise ValueError(f"{self.kind} -> r{self.dst}: `masks` must hold {wanted} ids, got {len(self.masks)}")


class LayerSpan(NamedTuple):
    """The instructions ``start .. end - 1`` of the plan compute the layer ``name``."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """A compiled encrypted forward pass (pure data: saved and loaded without PyTorch)."""

    slots: int
    input_layout: Layout
    instrs: tuple[Instr, ...]
    masks: tuple[Array, ...]
    outputs: tuple[int, ...]       # one register per class, the logit in every slot
    layers: tuple[LayerSpan, ...]
    n_registers: int

    def __post_init__(self) -> None:
        ends = [0, *(span.end for span in self.layers)]
        if [span.start for span in self.layers] != ends[:-1] or ends[-1] != len(self.instrs):
            raise ValueError("`layers` must cover the instructions in order, without gaps")
        written = self.n_inputs
        for n, ins in enumerate(self.instrs):
            if ins.dst != written or max(ins.srcs) >= written:
                raise ValueError(f"`instrs`[{n}] must write register {written} from earlier registers, got "
                                 f"{ins.dst} from {ins.srcs}")
            if ins.masks and max(ins.masks) >= len(self.masks):
                raise ValueError(f"`instrs`[{n}] uses mask {max(ins.masks)}, the plan has {len(self.masks)}")
            written += 1
        if written != self.n_registers or any(r >= written for r in self.outputs):
            raise ValueError(f"`n_registers` ({self.n_registers}) and `outputs` must match the {written} registers "
                             "the instructions write")

    @property
    def n_inputs(self) -> int:
        """Input ciphertexts (registers ``0 .. n_inputs - 1``)."""
        return self.input_layout.n_ct

    @property
    def steps(self) -> tuple[int, ...]:
        """The rotation steps used, sorted (the Galois keys a client must provide)."""
        return tuple(sorted({i.step for i in self.instrs if i.kind is Kind.ROT}))

    def free_after(self) -> dict[int, list[int]]:
        """For each instruction index, the registers whose last use it is (to release memory)."""
        last: dict[int, int] = {}
        for idx, ins in enumerate(self.instrs):
            for r in ins.srcs:
                last[r] = idx
        out_regs = set(self.outputs)
        free: dict[int, list[int]] = defaultdict(list)
        for r, idx in last.items():
            if r not in out_regs:
                free[idx].append(r)
        return dict(free)
