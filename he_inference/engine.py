"""Runs a :class:`~he_inference.plan.Plan` on SEAL ciphertexts (the server side).

Scale discipline: every masked product is encoded at ``q_l * Δ / scale(src)`` so that the
rescale that follows lands exactly on Δ; squares and ciphertext products are tracked as
they drift. A symbolic pass over the plan fixes every register's level and scale, so
every plaintext is encoded once, when the engine is built, at the level where it is used.
The engine holds only public material: :class:`~he_inference.keys.PublicKeys`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from federation.errors import CiphertextError, KeyMaterialError
from he_inference.ckks import CKKSParams, make_context
from he_inference.keys import PublicKeys, require_keys_for, require_public
from he_inference.plan import Kind, Plan

__all__ = ["Engine", "LayerTiming"]

log = logging.getLogger(__name__)


@dataclass
class LayerTiming:
    """Seconds and operation counts of one layer in one encrypted forward pass."""

    name: str
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)


class Engine:
    """The encrypted forward pass of one compiled model under one set of public keys."""

    def __init__(self, plan: Plan, params: CKKSParams, keys: PublicKeys | None = None, *,
                 instrs: Collection[int] | None = None, progress: Callable[[str], None] | None = None) -> None:
        """Encode the plaintexts of ``instrs`` (default: all); ``keys`` may come later (:meth:`use_keys`)."""
        self.plan, self.params = plan, params
        self.relin: seal.RelinKeys | None = None
        self.galois: seal.GaloisKeys | None = None
        self.ctx = make_context(params) if keys is None else require_public(keys).context
        if keys is not None:
            self.use_keys(keys)
        self.evaluator = seal.Evaluator(self.ctx)
        self.encoder = seal.CKKSEncoder(self.ctx)
        self._levels = self._level_table()
        self._symbolic()
        start = time.perf_counter()
        self._plain: dict[tuple[int, int], seal.Plaintext] = {}
        todo = range(len(plan.instrs)) if instrs is None else sorted(instrs)
        for n, idx in enumerate(todo):
            for pos, m in enumerate(plan.instrs[idx].masks):
                self._plain[(idx, pos)] = self._encode(plan.masks[m], *self._mask_at[(idx, pos)])
            if progress is not None and n % 500 == 0:
                progress(f"encoding plaintexts {n}/{len(todo)}")
        self.encode_seconds = time.perf_counter() - start

    def use_keys(self, keys: PublicKeys) -> None:
        """Evaluate with another client's evaluation keys (same parameters; the plaintexts stay)."""
        keys = require_keys_for(keys, self.params, self.plan.steps)
        self.relin, self.galois = keys.relin, keys.galois

    @property
    def top_level(self) -> int:
        """Chain index of fresh ciphertexts."""
        return len(self._levels) - 1

    def operand_level(self, idx: int) -> int:
        """The level instruction ``idx`` works at (counted from the bottom of the chain)."""
        return self._operand_level[idx]

    # -- symbolic levels and scales --------------------------------------------------------
    def _level_table(self) -> list[tuple[object, float]]:
        """(parms_id, prime dropped by the next rescale) per chain index, top level first."""
        out = []
        cd = self.ctx.first_context_data()
        while cd is not None:
            primes = cd.parms().coeff_modulus()
            out.append((cd.parms_id(), float(primes[-1].value())))
            cd = cd.next_context_data()
        return out

    def _symbolic(self) -> None:
        top = len(self._levels) - 1
        level = dict.fromkeys(range(self.plan.n_inputs), top)  # chain index counted from the bottom
        scale = dict.fromkeys(range(self.plan.n_inputs), self.params.scale)
        self._mask_at: dict[tuple[int, int], tuple[int, float]] = {}
        self._operand_level: dict[int, int] = {}
        delta = self.params.scale
        for idx, ins in enumerate(self.plan.instrs):
            lv = min(level[s] for s in ins.srcs)
            self._operand_level[idx] = lv
            q = self._levels[top - lv][1]
            if ins.kind is Kind.MULACC:
                for pos, s in enumerate(ins.srcs):
                    self._mask_at[(idx, pos)] = (lv, q * delta / scale[s])
                level[ins.dst], scale[ins.dst] = lv - 1, delta
            elif ins.kind is Kind.ADD_PLAIN:
                self._mask_at[(idx, 0)] = (lv, scale[ins.srcs[0]])
                level[ins.dst], scale[ins.dst] = lv, scale[ins.srcs[0]]
            elif ins.kind in (Kind.ROT, Kind.ADD):
                level[ins.dst], scale[ins.dst] = lv, scale[ins.srcs[0]]
            elif ins.kind is Kind.SQUARE:
                level[ins.dst], scale[ins.dst] = lv - 1, scale[ins.srcs[0]] ** 2 / q
            else:
                a, b = ins.srcs
                level[ins.dst], scale[ins.dst] = lv - 1, scale[a] * scale[b] / q
            if level[ins.dst] < 0:
                raise CiphertextError(f"plan needs more levels than {self.params} provides")
        self.output_scale = [scale[r] for r in self.plan.outputs]

    def _encode(self, values: np.ndarray, level: int, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        top = len(self._levels) - 1
        self.encoder.encode(values.tolist(), self._levels[top - level][0], scale, pt)
        return pt

    # -- the forward pass -------------------------------------------------------------------
    def _to_level(self, ct: seal.Ciphertext, level: int) -> seal.Ciphertext:
        top = len(self._levels) - 1
        target = self._levels[top - level][0]
        if ct.parms_id() == target:
            return ct
        out = seal.Ciphertext()
        self.evaluator.mod_switch_to(ct, target, out)
        return out

    def execute(self, regs: dict[int, seal.Ciphertext], indices: Iterable[int], counts: Counter[str]) -> None:
        """Run the instructions ``indices`` (in order) on the registers ``regs``, in place."""
        ev = self.evaluator
        if self.relin is None or self.galois is None:
            raise KeyMaterialError("no evaluation keys: the client's public keys must be registered first")
        for idx in indices:
            ins = self.plan.instrs[idx]
            lv = self._operand_level[idx]
            srcs = [self._to_level(regs[s], lv) for s in ins.srcs]
            out = seal.Ciphertext()
            if ins.kind is Kind.ROT:
                ev.rotate_vector(srcs[0], ins.step, self.galois, out)
            elif ins.kind is Kind.MULACC:
                tmp = seal.Ciphertext()
                for pos, ct in enumerate(srcs):
                    if pos == 0:
                        ev.multiply_plain(ct, self._plain[(idx, 0)], out)
                    else:
                        ev.multiply_plain(ct, self._plain[(idx, pos)], tmp)
                        ev.add_inplace(out, tmp)
                ev.rescale_to_next_inplace(out)
                out.scale = self.params.scale
            elif ins.kind is Kind.ADD:
                ev.add_many(srcs, out)
            elif ins.kind is Kind.ADD_PLAIN:
                ev.add_plain(srcs[0], self._plain[(idx, 0)], out)
            elif ins.kind is Kind.SQUARE:
                ev.square(srcs[0], out)
                ev.relinearize_inplace(out, self.relin)
                ev.rescale_to_next_inplace(out)
            else:
                ev.multiply(srcs[0], srcs[1], out)
                ev.relinearize_inplace(out, self.relin)
                ev.rescale_to_next_inplace(out)
            counts[ins.kind.value] += len(ins.masks) if ins.kind is Kind.MULACC else 1
            regs[ins.dst] = out

    def run(self, inputs: Sequence[seal.Ciphertext], *, progress: Callable[[str, int, int], None] | None = None
            ) -> tuple[list[seal.Ciphertext], list[LayerTiming]]:
        """Evaluate the plan; returns the output ciphertexts (one per class) and per-layer timings."""
        if len(inputs) != self.plan.n_inputs:
            raise CiphertextError(f"the model takes {self.plan.n_inputs} input ciphertexts, got {len(inputs)}")
        regs: dict[int, seal.Ciphertext] = dict(enumerate(inputs))
        free = self.plan.free_after()
        timings = []
        for n, (name, start, end) in enumerate(self.plan.layers):
            t0 = time.perf_counter()
            timing = LayerTiming(name)
            for idx in range(start, end):
                self.execute(regs, (idx,), timing.counts)
                for r in free.get(idx, []):
                    regs.pop(r, None)
            timing.seconds = time.perf_counter() - t0
            timings.append(timing)
            if progress is not None:
                progress(name, n + 1, len(self.plan.layers))
        return [regs[r] for r in self.plan.outputs], timings
