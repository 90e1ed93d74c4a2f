"""Runs a compiled model's :class:`~he_inference.passes.program.Plan` on SEAL ciphertexts (the server side).

Every level and scale comes from the model's one level assignment (the levels pass,
:mod:`he_inference.passes.levels`): each plaintext is encoded once, when the engine is
built, at the level and scale where it is used, and each masked product's rescale lands on
Δ. The engine holds only public material: :class:`~he_inference.keys.PublicKeys`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import psutil
import tenseal.sealapi as seal

from federation.errors import CiphertextError, HEError, KeyMaterialError
from he_inference.artifact import CompiledModel
from he_inference.ckks import make_context
from he_inference.keys import PublicKeys, require_keys_for, require_public
from he_inference.passes.program import Kind

__all__ = ["Engine", "LayerTiming"]

log = logging.getLogger(__name__)
SEAL_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, OverflowError)   # what tenseal.sealapi raises
PLAINTEXT_MEMORY_SHARE = 0.8   # the encoded plaintexts may take this share of the memory available at start


@dataclass(frozen=True)
class LayerTiming:
    """Seconds and operation counts (by instruction kind) of one layer in one encrypted forward pass."""

    name: str
    seconds: float
    counts: Mapping[Kind, int] = field(default_factory=dict)


class Engine:
    """The encrypted forward pass of one compiled model under one set of public keys."""

    def __init__(self, model: CompiledModel, keys: PublicKeys | None = None, *,
                 instrs: Collection[int] | None = None, progress: Callable[[str], None] | None = None) -> None:
        """Encode the plaintexts of ``instrs`` (default: all); ``keys`` may come later (:meth:`use_keys`)."""
        self.model = model
        self.plan, self.params, self.levels = model.plan, model.params, model.levels
        self.relin: seal.RelinKeys | None = None
        self.galois: seal.GaloisKeys | None = None
        self.ctx = make_context(self.params) if keys is None else require_public(keys).context
        if keys is not None:
            self.use_keys(keys)
        self.evaluator = seal.Evaluator(self.ctx)
        self.encoder = seal.CKKSEncoder(self.ctx)
        self._parms_ids = self._chain()
        todo = range(len(self.plan.instrs)) if instrs is None else sorted(instrs)
        need = model.plaintext_bytes if instrs is None else model.plaintext_bytes_of(todo)
        room = psutil.virtual_memory().available
        if need > PLAINTEXT_MEMORY_SHARE * room:
            raise HEError(f"encoding this model's plaintexts takes {need / 2**30:.1f} GiB and this machine has "
                          f"{room / 2**30:.1f} GiB available: compile a smaller model (fewer channels per layer "
                          "or a smaller input)")
        start = time.perf_counter()
        self._plain: dict[tuple[int, int], seal.Plaintext] = {}
        for n, idx in enumerate(todo):
            ins = self.plan.instrs[idx]
            for pos, m in enumerate(ins.masks):
                pt = self._encode(self.plan.masks[m], *self.levels.mask_at[idx][pos])
                if ins.kind is Kind.MULACC and pt.is_zero():   # the compiler drops these (lower.zero_threshold)
                    raise CiphertextError(f"instruction {idx} ({ins.kind}) of layer {self._layer_of(idx)!r}: its "
                                          f"mask {pos} encodes to the zero plaintext; recompile the model")
                self._plain[(idx, pos)] = pt
            if progress is not None and n % 500 == 0:
                progress(f"encoding plaintexts {n}/{len(todo)}")
        self.encode_seconds = time.perf_counter() - start
        log.debug("encoded %d plaintexts in %.2f s", len(self._plain), self.encode_seconds)

    def use_keys(self, keys: PublicKeys) -> None:
        """Evaluate with another client's evaluation keys (same parameters; the plaintexts stay)."""
        keys = require_keys_for(keys, self.params, self.plan.steps)
        self.relin, self.galois = keys.relin, keys.galois

    def _chain(self) -> list[object]:
        """SEAL's parms_id per level, bottom first; its primes must be those the levels were assigned for."""
        ids, primes = [], []
        cd = self.ctx.first_context_data()
        while cd is not None:
            ids.append(cd.parms_id())
            primes.append(int(cd.parms().coeff_modulus()[-1].value()))
            cd = cd.next_context_data()
        if tuple(reversed(primes)) != self.levels.primes:
            raise CiphertextError("the SEAL context's primes differ from those the model's levels were assigned for")
        return ids[::-1]

    def level_of(self, ct: seal.Ciphertext) -> int:
        """The level ``ct`` is at (chain index counted from the bottom)."""
        return self._parms_ids.index(ct.parms_id())

    def _encode(self, values: np.ndarray, level: int, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        self.encoder.encode(values.tolist(), self._parms_ids[level], scale, pt)
        return pt

    # -- the forward pass -------------------------------------------------------------------
    def _to_level(self, ct: seal.Ciphertext, level: int) -> seal.Ciphertext:
        target = self._parms_ids[level]
        if ct.parms_id() == target:
            return ct
        out = seal.Ciphertext()
        self.evaluator.mod_switch_to(ct, target, out)
        return out

    def execute(self, regs: dict[int, seal.Ciphertext], indices: Iterable[int], counts: Counter[Kind]) -> None:
        """Run the instructions ``indices`` (in order) on the registers ``regs``, in place.

        Raises
        ------
        CiphertextError
            SEAL refuses an instruction's operands (names the instruction and its layer).
        """
        if self.relin is None or self.galois is None:
            raise KeyMaterialError("no evaluation keys: the client's public keys must be registered first")
        for idx in indices:
            try:
                regs[self.plan.instrs[idx].dst] = self._apply(regs, idx, counts)
            except SEAL_ERRORS as exc:   # SEAL's std::invalid_argument / logic_error / out_of_range
                ins = self.plan.instrs[idx]
                raise CiphertextError(f"instruction {idx} ({ins.kind}) of layer {self._layer_of(idx)!r}: SEAL "
                                      f"refuses its operands ({str(exc)[:120]})") from exc

    def _layer_of(self, idx: int) -> str:
        return next((name for name, start, end in self.plan.layers if start <= idx < end), "?")

    def _apply(self, regs: dict[int, seal.Ciphertext], idx: int, counts: Counter[Kind]) -> seal.Ciphertext:
        """One instruction's result (SEAL's exceptions pass through: :meth:`execute` names them)."""
        ev = self.evaluator
        if self.relin is None or self.galois is None:
            raise KeyMaterialError("no evaluation keys: the client's public keys must be registered first")
        ins = self.plan.instrs[idx]
        lv = self.levels.operand_level[idx]
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
        counts[ins.kind] += len(ins.masks) if ins.kind is Kind.MULACC else 1
        return out

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
            counts = Counter[Kind]()
            for idx in range(start, end):
                self.execute(regs, (idx,), counts)
                for r in free.get(idx, []):
                    regs.pop(r, None)
            timings.append(LayerTiming(name, time.perf_counter() - t0, dict(counts)))
            if progress is not None:
                progress(name, n + 1, len(self.plan.layers))
        return [regs[r] for r in self.plan.outputs], timings
