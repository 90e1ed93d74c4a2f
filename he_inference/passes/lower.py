"""Pass 4, lower: a folded network and its packing → the instruction list of a :class:`~.program.Plan` (pure).

Linear layers
    For output channel ``o``, input channel ``i`` and kernel tap ``k`` the slot distance
    between what is read and where it is written is the same for every pixel, so a
    convolution is a sum of *rotated* input ciphertexts times *plaintext masks*. Each
    rotation ``r`` is split ``r = b + q G``: baby steps ``b`` rotate the inputs (shared by
    all outputs), giant steps ``q G`` rotate partial sums (once per output ciphertext),
    Gazelle / Halevi–Shoup style; ``G`` is chosen per layer to minimise the counted cost
    (:data:`~.cost.ROTATION_COST`). Masks are zero where no valid input is read, so padding,
    strides and the pools' partial sums at unused slots never leak into a result.

Polynomial activations
    Written in a shifted basis so that one ciphertext product suffices per degree-2 step:
    ``a2 (x + s)^2 + c`` (one level), ``a3 t (t^2 + e)`` (two), ``a4 t^2 (t^2 + e) + c1 t``
    (two). Their per-channel scalars are not applied under encryption: they are folded into
    the next linear layer's masks and bias (a deferred *term* list), as are average pools'
    ``1 / k^2``.

Zero masks
    A mask below ``zero_below`` (largest magnitude) would encode to the zero plaintext, and
    SEAL refuses a product by it ("result ciphertext is transparent"): such a term is
    dropped, its contribution being below CKKS's own resolution. An output ciphertext no
    term reaches does not depend on the input, and is refused with the layer's name.

Every op writes its output in the layout the layout pass chose for it (:mod:`~.layout`);
levels and costs of the result come from :mod:`~.levels` and :mod:`~.cost`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from federation.errors import UnsupportedLayerError
from he_inference.passes.cost import ROTATION_COST
from he_inference.passes.ir import Act, Array, AvgPool, Conv, Dense, Network, Norm, Op, Shape
from he_inference.passes.layout import Layout, Packing
from he_inference.passes.program import Instr, Kind, LayerSpan, Plan

__all__ = ["SHIFT_LIMIT", "lower", "zero_threshold"]

SHIFT_LIMIT = 8.0     # a shifted activation basis may move x by at most this many times its calibrated range


def zero_threshold(poly_degree: int, scale_bits: int) -> float:
    """Masks smaller than this (largest magnitude) may encode to the zero plaintext; larger ones cannot.

    CKKS encodes slot values ``v`` at scale Δ into integer coefficients ``m`` with
    ``||m||² = 2 Δ² ||v||² / N`` (the canonical embedding is √N times an isometry), so the
    largest coefficient is at least ``√2 Δ max|v| / N``: at ``max|v| ≥ N / Δ`` it is at
    least √2 and does not round to zero, with a factor 2 to spare for a mask scale below Δ.
    Dropping a smaller term changes a result by less than CKKS's own encoding error.
    """
    return poly_degree / 2.0 ** scale_bits


@dataclass(frozen=True)
class _Tensor:
    """A value under encryption: ``sum_t coef_t[c] * term_t + const[c]`` over one layout."""

    layout: Layout
    terms: tuple[tuple[tuple[int, ...], Array], ...]   # (register per ciphertext, per-channel coefficient)
    const: Array

    @property
    def plain(self) -> bool:
        """True when it is exactly its single term (coefficient 1, no constant)."""
        return (len(self.terms) == 1 and bool(np.all(self.terms[0][1] == 1.0))
                and not bool(np.any(self.const)))


class _Builder:
    """Appends instructions and masks; registers are numbered in the order they are written."""

    def __init__(self, packing: Packing, zero_below: float) -> None:
        self.slots, self.outputs = packing.slots, packing.outputs
        self.zero_below = zero_below
        self.instrs: list[Instr] = []
        self.masks: list[Array] = []
        self.next_reg = packing.input.n_ct

    def mask(self, v: Array) -> int:
        self.masks.append(v)
        return len(self.masks) - 1

    def nonzero(self, v: Array) -> bool:
        """Whether ``v`` survives encoding (a smaller mask is a zero plaintext: its term is dropped)."""
        return bool(np.abs(v).max(initial=0.0) >= self.zero_below) and bool(np.any(v))

    def mulacc(self, srcs: Sequence[int], vecs: Sequence[Array], *, layer: str, lay: Layout, ct: int) -> int:
        """``rescale(sum_j srcs_j * vecs_j)`` over the nonzero masks; none left is a named refusal."""
        keep = [(r, v) for r, v in zip(srcs, vecs, strict=True) if self.nonzero(v)]
        if not keep:
            raise _independent(layer, lay, ct, self.zero_below)
        return self.emit(Kind.MULACC, [r for r, _ in keep], masks=[self.mask(v) for _, v in keep])

    def emit(self, kind: Kind, srcs: Sequence[int], *, masks: Sequence[int] = (), step: int = 0) -> int:
        dst = self.next_reg
        self.next_reg += 1
        self.instrs.append(Instr(kind, dst, tuple(srcs), tuple(masks), step))
        return dst

    def rot(self, src: int, step: int) -> int:
        step = _signed(step, self.slots)
        return src if step == 0 else self.emit(Kind.ROT, [src], step=step)

    def add(self, srcs: Sequence[int]) -> int:
        return srcs[0] if len(srcs) == 1 else self.emit(Kind.ADD, srcs)


def _independent(layer: str, lay: Layout, ct: int, zero_below: float) -> UnsupportedLayerError:
    channels = [c for c in range(lay.shape[0]) if lay.ct[c] == ct]
    return UnsupportedLayerError(
        f"{layer}: output channels {channels[0]}–{channels[-1]} do not depend on the input (every weight reaching "
        f"them is below the CKKS resolution {zero_below:.2g}); prune them or retrain")


def _signed(step: int, slots: int) -> int:
    step %= slots
    return step - slots if step > slots // 2 else step


# -- linear layers -----------------------------------------------------------------------------

@dataclass
class _Contribution:
    """Weights ``w`` written at output slots ``t`` of out-ciphertext ``out_ct`` read at rotation ``r``."""

    term: int
    in_ct: int
    out_ct: int
    r: int
    t: npt.NDArray[np.int64]
    w: Array


def _conv_contributions(conv: Conv, x: _Tensor, out: Layout, slots: int) -> list[_Contribution]:
    inl = x.layout
    _, h, w = inl.shape
    _, ho, wo = out.shape
    (sy, sx), (py, px) = conv.stride, conv.padding
    kh, kw = conv.weight.shape[2:]
    contributions: list[_Contribution] = []
    ys, xs = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    for o in range(out.shape[0]):
        t_all = out.slots(o)
        for ky in range(kh):
            iy = ys * sy + ky - py
            for kx in range(kw):
                ix = xs * sx + kx - px
                valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                if not valid.any():
                    continue
                t = t_all[valid]
                for ti, (_, coef) in enumerate(x.terms):
                    for i in range(inl.shape[0]):
                        wt = conv.weight[o, i, ky, kx] * coef[i]
                        if wt == 0.0:
                            continue
                        u = inl.offset[i] + iy[valid] * inl.gap[0] * inl.row + ix[valid] * inl.gap[1]
                        rs = (u - t) % slots
                        if np.any(rs != rs[0]):
                            raise UnsupportedLayerError(f"{conv.name}: output layout incompatible with the stride")
                        r = int(rs[0])
                        contributions.append(_Contribution(ti, inl.ct[i], out.ct[o], r, t, np.full(t.shape, wt)))
    return contributions


def _choose_giant(contribs: Sequence[_Contribution], slots: int, row: int) -> int:
    """The giant step G minimising ROTATION_COST x rotations + masks."""
    candidates = {1, slots} | {2**k for k in range(int(math.log2(slots)) + 1)} | {row * 2**k for k in range(12)
                                                                                  if row * 2**k <= slots}
    best: tuple[float, int] = (math.inf, 1)
    for g in sorted(candidates):
        babies: set[tuple[int, int, int]] = set()
        giants: set[tuple[int, int]] = set()
        masks: set[tuple[int, int, int, int, int]] = set()
        for c in contribs:
            b = c.r % g
            q = (c.r - b) % slots
            if b:
                babies.add((c.term, c.in_ct, b))
            if q:
                giants.add((c.out_ct, q))
            masks.add((c.out_ct, q, c.term, c.in_ct, b))
        cost = ROTATION_COST * (len(babies) + len(giants)) + len(masks)
        if cost < best[0]:
            best = (cost, g)
    return best[1]


def _emit_linear(bld: _Builder, x: _Tensor, contribs: Sequence[_Contribution], out: Layout,
                 bias: Array, layer: str) -> _Tensor:
    """Emit rotations, masked products and giant-step sums; add the bias map."""
    slots = bld.slots
    g = _choose_giant(contribs, slots, out.row)
    # every term at the same level first: the engine mod-switches operands of one MULACC down
    grouped: dict[int, dict[int, dict[tuple[int, int, int], Array]]] = defaultdict(lambda: defaultdict(dict))
    for c in contribs:
        b = c.r % g
        q = (c.r - b) % slots
        key = (c.term, c.in_ct, b)
        vec = grouped[c.out_ct][q].get(key)
        if vec is None:
            vec = np.zeros(slots)
            grouped[c.out_ct][q][key] = vec
        # the mask multiplies the baby-rotated input; the giant rotation by q comes after
        np.add.at(vec, (c.t + q) % slots, c.w)
    rotated: dict[tuple[int, int, int], int] = {}

    def baby(term: int, in_ct: int, b: int) -> int:
        key = (term, in_ct, b)
        if key not in rotated:
            rotated[key] = bld.rot(x.terms[term][0][in_ct], b)
        return rotated[key]

    regs: list[int] = []
    bias_vecs = out.pack(bias, slots)
    for oc in range(out.n_ct):
        parts = []
        for q, entries in sorted(grouped[oc].items()):
            kept = {key: v for key, v in entries.items() if bld.nonzero(v)}
            if kept:
                acc = bld.emit(Kind.MULACC, [baby(*key) for key in kept], masks=[bld.mask(v) for v in kept.values()])
                parts.append(bld.rot(acc, q))
        if not parts:  # an output ciphertext no weight reaches: it would be the bias alone
            raise _independent(layer, out, oc, bld.zero_below)
        total = bld.add(parts)
        regs.append(bld.emit(Kind.ADD_PLAIN, [total], masks=[bld.mask(bias_vecs[oc])]))
    return _Tensor(out, ((tuple(regs), np.ones(out.shape[0])),), np.zeros(out.shape[0]))


def _const_response(conv: Conv, const: Array, shape: Shape) -> Array:
    """The conv's output for a constant-per-channel input (zero padding): the bias map of the deferred constants."""
    img = torch.from_numpy(np.broadcast_to(const[:, None, None], shape).copy())[None]
    out = torch.nn.functional.conv2d(img, torch.from_numpy(conv.weight), torch.from_numpy(conv.bias),
                                     conv.stride, conv.padding)
    return out[0].numpy()


def _conv(bld: _Builder, conv: Conv, x: _Tensor) -> _Tensor:
    out = bld.outputs[conv.name]
    contribs = _conv_contributions(conv, x, out, bld.slots)
    return _emit_linear(bld, x, contribs, out, _const_response(conv, x.const, x.layout.shape), conv.name)


def _pool(bld: _Builder, pool: AvgPool, x: _Tensor) -> _Tensor:
    kh, kw = pool.kernel
    lay = x.layout
    terms = []
    for regs, coef in x.terms:
        new = []
        for r in regs:
            acc = bld.add([r] + [bld.rot(r, dx * lay.gap[1]) for dx in range(1, kw)])
            acc = bld.add([acc] + [bld.rot(acc, dy * lay.gap[0] * lay.row) for dy in range(1, kh)])
            new.append(acc)
        terms.append((tuple(new), coef / (kh * kw)))
    return _Tensor(bld.outputs[pool.name], tuple(terms), x.const.copy())


def _materialise(bld: _Builder, x: _Tensor, layer: str) -> _Tensor:
    """Apply deferred coefficients and constant under encryption (one level)."""
    lay = x.layout
    regs = []
    for ct in range(lay.n_ct):
        srcs = [term_regs[ct] for term_regs, _ in x.terms]
        vecs = [lay.pack(np.broadcast_to(coef[:, None, None], lay.shape), bld.slots)[ct] for _, coef in x.terms]
        acc = bld.mulacc(srcs, vecs, layer=layer, lay=lay, ct=ct)
        const = lay.pack(np.broadcast_to(x.const[:, None, None], lay.shape), bld.slots)[ct]
        regs.append(bld.emit(Kind.ADD_PLAIN, [acc], masks=[bld.mask(const)]))
    return _Tensor(lay, ((tuple(regs), np.ones(lay.shape[0])),), np.zeros(lay.shape[0]))


def _shifted(coef: Array, shift: Array) -> Array:
    """Coefficients (increasing) of ``p(t - shift)`` per channel; ``coef`` is (d + 1, C)."""
    d, c = coef.shape[0] - 1, coef.shape[1]
    out = np.zeros_like(coef)
    for ch in range(c):
        p = np.polynomial.Polynomial(coef[:, ch])
        q = p(np.polynomial.Polynomial([-shift[ch], 1.0]))
        out[: len(q.coef), ch] = q.coef[: d + 1]
    return out


def _act(bld: _Builder, act: Act, x: _Tensor, calib_range: float) -> _Tensor:
    if not x.plain:
        x = _materialise(bld, x, act.name)
    lay = x.layout
    regs = x.terms[0][0]
    a = act.coef
    d = act.degree
    if d < 2 or d > 4:
        raise UnsupportedLayerError(f"{act.name} (PolyAct): degree {d}; degrees 2, 3 and 4 are supported")

    def add_vec(rs: Sequence[int], per_channel: Array) -> list[int]:
        vecs = lay.pack(np.broadcast_to(per_channel[:, None, None], lay.shape), bld.slots)
        return [bld.emit(Kind.ADD_PLAIN, [r], masks=[bld.mask(v)]) for r, v in zip(rs, vecs, strict=True)]

    lead = a[d]
    limit = SHIFT_LIMIT * max(calib_range, 1e-3)
    shift = np.zeros(a.shape[1])
    if np.all(np.abs(lead) > 1e-9):
        shift = a[d - 1] / (d * lead)
    if np.all(np.abs(lead) > 1e-9) and np.all(np.abs(shift) <= limit):
        q = _shifted(a, shift)  # p(x) = q(t), t = x + shift, q has no t^(d-1) term
        t = add_vec(regs, shift)
        if d == 2:
            sq = [bld.emit(Kind.SQUARE, [r]) for r in t]
            return _Tensor(lay, ((tuple(sq), q[2]),), q[0])
        t2 = [bld.emit(Kind.SQUARE, [r]) for r in t]
        u = add_vec(t2, q[d - 2] / q[d])
        if d == 3:  # a3 t (t^2 + e)
            v = [bld.emit(Kind.MUL, [ti, ui]) for ti, ui in zip(t, u, strict=True)]
            return _Tensor(lay, ((tuple(v), q[3]),), q[0])
        v = [bld.emit(Kind.MUL, [t2i, ui]) for t2i, ui in zip(t2, u, strict=True)]  # a4 t^2 (t^2 + e) + c1 t
        return _Tensor(lay, ((tuple(v), q[4]), (tuple(t), q[1])), q[0])
    # power basis: x, x^2, x^3 = x^2 x, x^4 = (x^2)^2
    x2 = [bld.emit(Kind.SQUARE, [r]) for r in regs]
    terms = [(tuple(regs), a[1]), (tuple(x2), a[2])]
    if d >= 3:
        terms.append((tuple(bld.emit(Kind.MUL, [p, r]) for p, r in zip(x2, regs, strict=True)), a[3]))
    if d == 4:
        terms.append((tuple(bld.emit(Kind.SQUARE, [p]) for p in x2), a[4]))
    return _Tensor(lay, tuple(terms), a[0].copy())


def _dense(bld: _Builder, dense: Dense, x: _Tensor) -> list[int]:
    lay = x.layout
    k = dense.weight.shape[0]
    outputs = []
    for cls in range(k):
        w = dense.weight[cls]
        srcs, vecs = [], []
        for regs, coef in x.terms:
            for ct, v in enumerate(lay.pack(w * coef[:, None, None], bld.slots)):
                srcs.append(regs[ct])
                vecs.append(v)
        if not any(bld.nonzero(v) for v in vecs):
            raise UnsupportedLayerError(f"{dense.name}: logit {cls} does not depend on the input (every weight is "
                                        f"below the CKKS resolution {bld.zero_below:.2g})")
        acc = bld.mulacc(srcs, vecs, layer=dense.name, lay=lay, ct=0)
        step = bld.slots // 2
        while step >= 1:  # rotate and sum: every slot ends up with the total
            acc = bld.add([acc, bld.rot(acc, step)])
            step //= 2
        bias = dense.bias[cls] + float(np.sum(w * x.const[:, None, None]))
        outputs.append(bld.emit(Kind.ADD_PLAIN, [acc], masks=[bld.mask(np.full(bld.slots, bias))]))
    return outputs


def lower(net: Network, *, packing: Packing, ranges: Sequence[float], zero_below: float = 0.0) -> Plan:
    """The instructions and masks of ``net`` in ``packing``.

    ``ranges`` (from :func:`~.interpret.value_ranges`) bound the activations' inputs: they
    decide whether an activation may use the shifted basis. A mask whose largest magnitude
    is below ``zero_below`` is a zero plaintext (:func:`zero_threshold`): its term is dropped.

    Raises
    ------
    UnsupportedLayerError
        A normalisation that was not folded, a residual body without a convolution, an
        activation degree other than 2, 3 or 4, or an output that does not depend on the input.
    """
    bld = _Builder(packing, zero_below)
    inp = packing.input
    x = _Tensor(inp, ((tuple(range(inp.n_ct)), np.ones(inp.shape[0])),), np.zeros(inp.shape[0]))
    layers: list[LayerSpan] = []

    def run(ops: Sequence[Op], x: _Tensor, rng: Sequence[float]) -> _Tensor:
        for idx, op in enumerate(ops):
            start = len(bld.instrs)
            if isinstance(op, Conv):
                x = _conv(bld, op, x)
            elif isinstance(op, AvgPool):
                x = _pool(bld, op, x)
            elif isinstance(op, Act):
                x = _act(bld, op, x, rng[idx] if idx < len(rng) else rng[-1])
            elif isinstance(op, Norm):
                raise UnsupportedLayerError(f"{op.name} (BatchNorm2d): not folded; run the fold pass first")
            else:
                if not any(isinstance(o, Conv) for o in op.body):
                    raise UnsupportedLayerError(f"{op.name} (Residual): the body needs a convolution")
                body = run(op.body, x, [rng[idx]] * len(op.body))
                x = _Tensor(x.layout, x.terms + body.terms, x.const + body.const)
                continue  # a residual add is a term union: no instructions of its own (its body's layers are listed)
            layers.append(LayerSpan(op.name, start, len(bld.instrs)))
        return x

    x = run(net.ops, x, ranges)
    start = len(bld.instrs)
    outputs = _dense(bld, net.dense, x)
    layers.append(LayerSpan(net.dense.name, start, len(bld.instrs)))
    return Plan(packing.slots, inp, tuple(bld.instrs), tuple(bld.masks), tuple(outputs), tuple(layers),
                bld.next_reg)
