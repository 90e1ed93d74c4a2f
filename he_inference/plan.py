"""Slot packing and the instruction list of an encrypted forward pass (pure numpy).

Layout
    Every ciphertext has ``S`` slots. A base grid of ``Hb x Wb`` slots (one *block*) holds
    a channel at full resolution; a ciphertext holds ``S // (Hb Wb)`` blocks. After a pool
    or a strided convolution by ``k`` a channel keeps its block but uses only every k-th
    row and column (its *gap* grows by k). The next convolution writes its output
    *multiplexed*: ``gap_y x gap_x`` channels interleave in one block, each on its own
    sub-lattice, so the slots stay full (Lee et al., ICML 2022). Channel ``c`` pixel
    ``(y, x)`` sits at ``offset[c] + y gap_y Wb + x gap_x`` of ciphertext ``ct[c]``.

Linear layers
    For output channel ``o``, input channel ``i`` and kernel tap ``k`` the slot distance
    between what is read and where it is written is the same for every pixel, so a
    convolution is a sum of *rotated* input ciphertexts times *plaintext masks*. Each
    rotation ``r`` is split ``r = b + q G``: baby steps ``b`` rotate the inputs (shared by
    all outputs), giant steps ``q G`` rotate partial sums (once per output ciphertext),
    Gazelle / Halevi–Shoup style; ``G`` is chosen per layer to minimise the counted cost.
    Masks are zero where no valid input is read, so padding, strides and the pools' partial
    sums at unused slots never leak into a result.

Polynomial activations
    Written in a shifted basis so that one ciphertext product suffices per degree-2 step:
    ``a2 (x + s)^2 + c`` (one level), ``a3 t (t^2 + e)`` (two), ``a4 t^2 (t^2 + e) + c1 t``
    (two). Their per-channel scalars are not applied under encryption: they are folded into
    the next linear layer's masks and bias (a deferred *term* list), as are average pools'
    ``1 / k^2``.

The plan is a list of :class:`Instr` over numbered registers; :class:`SlotSimulator` runs it
on numpy vectors (exact, for tests and cost counting) and :mod:`he_inference.engine` on CKKS
ciphertexts.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from federation.errors import DepthError, UnsupportedLayerError
from he_inference.ir import Act, AvgPool, Conv, Dense, Network, Op, Residual, Shape, value_ranges

__all__ = ["Instr", "Kind", "LayerStats", "Layout", "Plan", "SlotSimulator", "build_plan"]

Array = npt.NDArray[np.float64]

ROTATION_COST = 20.0  # one key switch ~ 20 plaintext multiply-adds (see the CKKS cost notes)
SHIFT_LIMIT = 8.0     # a shifted activation basis may move x by at most this many times its calibrated range


class Kind(enum.StrEnum):
    """Instruction kinds."""

    ROT = "rot"            # dst = rotate(a, step)
    MULACC = "mulacc"      # dst = rescale(sum_j a_j * mask_j)
    ADD = "add"            # dst = sum a_j
    ADD_PLAIN = "addp"     # dst = a + mask
    SQUARE = "square"      # dst = rescale(relin(a * a))
    MUL = "mul"            # dst = rescale(relin(a * b))


@dataclass(frozen=True)
class Instr:
    """One instruction: ``dst`` register, operand registers, masks (ids into ``Plan.masks``), a step."""

    kind: Kind
    dst: int
    srcs: tuple[int, ...]
    masks: tuple[int, ...] = ()
    step: int = 0


@dataclass(frozen=True)
class Layout:
    """Where each channel of a (C, H, W) tensor lives (see the module docstring)."""

    shape: Shape
    gap: tuple[int, int]
    row: int                      # Wb: slot distance between base rows
    ct: tuple[int, ...]           # ciphertext index of each channel
    offset: tuple[int, ...]       # first slot of each channel

    @property
    def n_ct(self) -> int:
        """Number of ciphertexts."""
        return max(self.ct) + 1

    def slots(self, c: int) -> npt.NDArray[np.int64]:
        """Slot index of every pixel of channel ``c``, shape (H, W)."""
        _, h, w = self.shape
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return self.offset[c] + ys * self.gap[0] * self.row + xs * self.gap[1]

    def pack(self, x: Array, slots: int) -> list[Array]:
        """Place a (C, H, W) array into ``n_ct`` slot vectors."""
        out = [np.zeros(slots) for _ in range(self.n_ct)]
        for c in range(self.shape[0]):
            out[self.ct[c]][self.slots(c)] = x[c]
        return out

    def unpack(self, vectors: Sequence[Array]) -> Array:
        """Inverse of :meth:`pack` (reads the valid slots only)."""
        return np.stack([np.asarray(vectors[self.ct[c]])[self.slots(c)] for c in range(self.shape[0])])


def fresh_layout(shape: Shape, gap: tuple[int, int], *, block: tuple[int, int], slots: int) -> Layout:
    """A dense layout: channels fill blocks, each block multiplexing ``gap_y x gap_x`` channels."""
    hb, wb = block
    blocks = slots // (hb * wb)
    positions = [b * hb * wb + oy * wb + ox for b in range(blocks) for oy in range(gap[0]) for ox in range(gap[1])]
    per_ct = len(positions)
    c = shape[0]
    return Layout(shape, gap, wb, tuple(i // per_ct for i in range(c)),
                  tuple(positions[i % per_ct] for i in range(c)))


@dataclass
class Tensor:
    """A value under encryption: ``sum_t coef_t[c] * term_t + const[c]`` over one layout."""

    layout: Layout
    terms: list[tuple[list[int], Array]]       # (register per ciphertext, per-channel coefficient)
    const: Array

    @property
    def plain(self) -> bool:
        """True when it is exactly its single term (coefficient 1, no constant)."""
        return (len(self.terms) == 1 and bool(np.all(self.terms[0][1] == 1.0))
                and not bool(np.any(self.const)))


@dataclass(frozen=True)
class LayerStats:
    """What a layer costs: counts of each instruction kind and its levels."""

    name: str
    kind: str
    rotations: int
    plain_mults: int
    ct_mults: int
    levels: int


@dataclass
class Plan:
    """A compiled encrypted forward pass (pure data: saved and loaded without PyTorch)."""

    slots: int
    input_layout: Layout
    n_inputs: int
    instrs: list[Instr]
    masks: list[Array]
    outputs: list[int]                         # one register per class, the logit in every slot
    layers: list[tuple[str, int, int]]         # (name, first instr, end instr)
    depth: int
    steps: list[int]                           # rotation steps used (Galois keys needed)
    n_registers: int
    stats: list[LayerStats] = field(default_factory=list)

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


class _Builder:
    def __init__(self, slots: int, block: tuple[int, int]) -> None:
        self.slots, self.block = slots, block
        self.instrs: list[Instr] = []
        self.masks: list[Array] = []
        self.depth: dict[int, int] = {}
        self.next_reg = 0

    def reg(self, depth: int) -> int:
        r = self.next_reg
        self.next_reg += 1
        self.depth[r] = depth
        return r

    def mask(self, v: Array) -> int:
        self.masks.append(v)
        return len(self.masks) - 1

    def emit(self, kind: Kind, srcs: Sequence[int], *, masks: Sequence[int] = (), step: int = 0) -> int:
        d = max(self.depth[s] for s in srcs)
        if kind in (Kind.MULACC, Kind.SQUARE, Kind.MUL):
            d += 1
        dst = self.reg(d)
        self.instrs.append(Instr(kind, dst, tuple(srcs), tuple(masks), step))
        return dst

    def rot(self, src: int, step: int) -> int:
        step = _signed(step, self.slots)
        return src if step == 0 else self.emit(Kind.ROT, [src], step=step)

    def add(self, srcs: Sequence[int]) -> int:
        return srcs[0] if len(srcs) == 1 else self.emit(Kind.ADD, srcs)


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


def _conv_contributions(conv: Conv, x: Tensor, out: Layout, slots: int) -> list[_Contribution]:
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


def _emit_linear(bld: _Builder, x: Tensor, contribs: Sequence[_Contribution], out: Layout,
                 bias: Array) -> Tensor:
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
            srcs = [baby(*key) for key in entries]
            masks = [bld.mask(v) for v in entries.values()]
            acc = bld.emit(Kind.MULACC, srcs, masks=masks)
            parts.append(bld.rot(acc, q))
        if not parts:  # an output ciphertext no weight reaches: bias only, from a zero product
            src = x.terms[0][0][0]
            parts.append(bld.emit(Kind.MULACC, [src], masks=[bld.mask(np.zeros(slots))]))
        total = bld.add(parts)
        regs.append(bld.emit(Kind.ADD_PLAIN, [total], masks=[bld.mask(bias_vecs[oc])]))
    return Tensor(out, [(regs, np.ones(out.shape[0]))], np.zeros(out.shape[0]))


def _const_response(conv: Conv, const: Array, shape: Shape) -> Array:
    """The conv's output for a constant-per-channel input (zero padding): the bias map of the deferred constants."""
    img = torch.from_numpy(np.broadcast_to(const[:, None, None], shape).copy())[None]
    out = torch.nn.functional.conv2d(img, torch.from_numpy(conv.weight), torch.from_numpy(conv.bias),
                                     conv.stride, conv.padding)
    return out[0].numpy()


def _conv(bld: _Builder, conv: Conv, x: Tensor, out: Layout | None) -> Tensor:
    shape = conv.out_shape(x.layout.shape)
    if out is None:
        gap = (x.layout.gap[0] * conv.stride[0], x.layout.gap[1] * conv.stride[1])
        out = fresh_layout(shape, gap, block=bld.block, slots=bld.slots)
    contribs = _conv_contributions(conv, x, out, bld.slots)
    return _emit_linear(bld, x, contribs, out, _const_response(conv, x.const, x.layout.shape))


def _pool(bld: _Builder, pool: AvgPool, x: Tensor) -> Tensor:
    kh, kw = pool.kernel
    lay = x.layout
    terms = []
    for regs, coef in x.terms:
        new = []
        for r in regs:
            acc = bld.add([r] + [bld.rot(r, dx * lay.gap[1]) for dx in range(1, kw)])
            acc = bld.add([acc] + [bld.rot(acc, dy * lay.gap[0] * lay.row) for dy in range(1, kh)])
            new.append(acc)
        terms.append((new, coef / (kh * kw)))
    c, h, w = lay.shape
    out = Layout((c, h // kh, w // kw), (lay.gap[0] * kh, lay.gap[1] * kw), lay.row, lay.ct, lay.offset)
    return Tensor(out, terms, x.const.copy())


def _materialise(bld: _Builder, x: Tensor) -> Tensor:
    """Apply deferred coefficients and constant under encryption (one level)."""
    lay = x.layout
    regs = []
    for ct in range(lay.n_ct):
        srcs, masks = [], []
        for term_regs, coef in x.terms:
            srcs.append(term_regs[ct])
            masks.append(bld.mask(lay.pack(np.broadcast_to(coef[:, None, None], lay.shape), bld.slots)[ct]))
        acc = bld.emit(Kind.MULACC, srcs, masks=masks)
        const = lay.pack(np.broadcast_to(x.const[:, None, None], lay.shape), bld.slots)[ct]
        regs.append(bld.emit(Kind.ADD_PLAIN, [acc], masks=[bld.mask(const)]))
    return Tensor(lay, [(regs, np.ones(lay.shape[0]))], np.zeros(lay.shape[0]))


def _shifted(coef: Array, shift: Array) -> Array:
    """Coefficients (increasing) of ``p(t - shift)`` per channel; ``coef`` is (d + 1, C)."""
    d, c = coef.shape[0] - 1, coef.shape[1]
    out = np.zeros_like(coef)
    for ch in range(c):
        p = np.polynomial.Polynomial(coef[:, ch])
        q = p(np.polynomial.Polynomial([-shift[ch], 1.0]))
        out[: len(q.coef), ch] = q.coef[: d + 1]
    return out


def _act(bld: _Builder, act: Act, x: Tensor, calib_range: float) -> Tensor:
    if not x.plain:
        x = _materialise(bld, x)
    lay = x.layout
    regs = x.terms[0][0]
    a = act.coef
    d = act.degree
    if d < 2 or d > 4:
        raise UnsupportedLayerError(f"{act.name} (PolyAct): degree {d}; degrees 2, 3 and 4 are supported")

    def add_vec(rs: list[int], per_channel: Array) -> list[int]:
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
            return Tensor(lay, [(sq, q[2])], q[0])
        t2 = [bld.emit(Kind.SQUARE, [r]) for r in t]
        u = add_vec(t2, q[d - 2] / q[d])
        if d == 3:  # a3 t (t^2 + e)
            v = [bld.emit(Kind.MUL, [ti, ui]) for ti, ui in zip(t, u, strict=True)]
            return Tensor(lay, [(v, q[3])], q[0])
        v = [bld.emit(Kind.MUL, [t2i, ui]) for t2i, ui in zip(t2, u, strict=True)]  # a4 t^2 (t^2 + e) + c1 t
        return Tensor(lay, [(v, q[4]), (t, q[1])], q[0])
    # power basis: x, x^2, x^3 = x^2 x, x^4 = (x^2)^2
    x2 = [bld.emit(Kind.SQUARE, [r]) for r in regs]
    terms = [(regs, a[1]), (x2, a[2])]
    if d >= 3:
        terms.append(([bld.emit(Kind.MUL, [p, r]) for p, r in zip(x2, regs, strict=True)], a[3]))
    if d == 4:
        terms.append(([bld.emit(Kind.SQUARE, [p]) for p in x2], a[4]))
    return Tensor(lay, terms, a[0].copy())


def _dense(bld: _Builder, dense: Dense, x: Tensor) -> list[int]:
    lay = x.layout
    k = dense.weight.shape[0]
    outputs = []
    for cls in range(k):
        w = dense.weight[cls]
        srcs, masks = [], []
        for regs, coef in x.terms:
            vecs = lay.pack(w * coef[:, None, None], bld.slots)
            for ct, v in enumerate(vecs):
                if np.any(v):
                    srcs.append(regs[ct])
                    masks.append(bld.mask(v))
        acc = bld.emit(Kind.MULACC, srcs, masks=masks)
        step = bld.slots // 2
        while step >= 1:  # rotate and sum: every slot ends up with the total
            acc = bld.add([acc, bld.rot(acc, step)])
            step //= 2
        bias = dense.bias[cls] + float(np.sum(w * x.const[:, None, None]))
        outputs.append(bld.emit(Kind.ADD_PLAIN, [acc], masks=[bld.mask(np.full(bld.slots, bias))]))
    return outputs


def _block(net: Network) -> tuple[int, int]:
    """Base grid: the largest (H gap_y, W gap_x) any tensor of the network needs."""
    hb, wb = net.input_shape[1:]
    gap = (1, 1)

    def visit(ops: Sequence[Op], shape: Shape, gap: tuple[int, int]) -> tuple[Shape, tuple[int, int]]:
        nonlocal hb, wb
        for op in ops:
            if isinstance(op, Conv):
                shape, gap = op.out_shape(shape), (gap[0] * op.stride[0], gap[1] * op.stride[1])
            elif isinstance(op, AvgPool):
                shape, gap = op.out_shape(shape), (gap[0] * op.kernel[0], gap[1] * op.kernel[1])
            elif isinstance(op, Residual):
                visit(op.body, shape, gap)
            hb, wb = max(hb, shape[1] * gap[0]), max(wb, shape[2] * gap[1])
        return shape, gap

    visit(net.ops, net.input_shape, gap)
    return hb, wb


def build_plan(net: Network, *, slots: int, calibration: Array | None = None,
               ranges: Sequence[float] | None = None) -> Plan:
    """Pack and schedule ``net`` for ciphertexts of ``slots`` slots.

    ``ranges`` (from :func:`~he_inference.ir.value_ranges`) bound the activations' inputs;
    without them they are computed on ``calibration``.

    Raises
    ------
    DepthError
        One channel at full resolution does not fit in a ciphertext.
    """
    block = _block(net)
    if block[0] * block[1] > slots:
        raise DepthError(f"a {block[0]}x{block[1]} channel needs {block[0] * block[1]} slots, a ciphertext has "
                         f"{slots}: use a patchify first convolution (kernel = stride) or a larger ring")
    bld = _Builder(slots, block)
    inp = fresh_layout(net.input_shape, (1, 1), block=block, slots=slots)
    x = Tensor(inp, [([bld.reg(0) for _ in range(inp.n_ct)], np.ones(inp.shape[0]))], np.zeros(inp.shape[0]))
    if ranges is None:
        ranges = value_ranges(net, calibration)
    layers: list[tuple[str, int, int]] = []

    def run(ops: Sequence[Op], x: Tensor, rng: Sequence[float], target: Layout | None) -> Tensor:
        last_conv = max((i for i, o in enumerate(ops) if isinstance(o, Conv)), default=-1)
        for idx, op in enumerate(ops):
            start = len(bld.instrs)
            if isinstance(op, Conv):
                x = _conv(bld, op, x, target if idx == last_conv else None)
            elif isinstance(op, AvgPool):
                x = _pool(bld, op, x)
            elif isinstance(op, Act):
                x = _act(bld, op, x, rng[idx] if idx < len(rng) else rng[-1])
            else:
                if not any(isinstance(o, Conv) for o in op.body):
                    raise UnsupportedLayerError(f"{op.name} (Residual): the body needs a convolution")
                body = run(op.body, Tensor(x.layout, list(x.terms), x.const.copy()), [rng[idx]] * len(op.body),
                           x.layout)
                x = Tensor(x.layout, list(x.terms) + body.terms, x.const + body.const)
                continue  # a residual add is a term union: no instructions of its own (its body's layers are listed)
            layers.append((op.name, start, len(bld.instrs)))
        return x

    x = run(net.ops, x, ranges, None)
    start = len(bld.instrs)
    outputs = _dense(bld, net.dense, x)
    layers.append((net.dense.name, start, len(bld.instrs)))
    depth = max(bld.depth[r] for r in outputs)
    steps = sorted({i.step for i in bld.instrs if i.kind is Kind.ROT})
    plan = Plan(slots, inp, inp.n_ct, bld.instrs, bld.masks, outputs, layers, depth, steps, bld.next_reg)
    plan.stats = [_stats(plan, bld.depth, name, s, e) for name, s, e in layers]
    return plan


def _stats(plan: Plan, depth: dict[int, int], name: str, start: int, end: int) -> LayerStats:
    ins = plan.instrs[start:end]
    kinds = {i.kind for i in ins}
    kind = "linear" if Kind.MULACC in kinds else ("activation" if kinds & {Kind.SQUARE, Kind.MUL} else "pool")
    levels = max((depth[i.dst] for i in ins), default=0) - min((depth[s] for i in ins for s in i.srcs), default=0)
    return LayerStats(name, kind, sum(i.kind is Kind.ROT for i in ins), sum(len(i.masks) for i in ins
                                                                           if i.kind is Kind.MULACC),
                      sum(i.kind in (Kind.SQUARE, Kind.MUL) for i in ins), levels)


class SlotSimulator:
    """Runs a plan on plain numpy slot vectors: exact arithmetic, for tests and cost counts."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def apply(self, idx: int, regs: dict[int, Array]) -> None:
        """Execute instruction ``idx`` on ``regs`` in place."""
        ins = self.plan.instrs[idx]
        a = [regs[s] for s in ins.srcs]
        if ins.kind is Kind.ROT:
            v = np.roll(a[0], -ins.step)
        elif ins.kind is Kind.MULACC:
            v = sum((s * self.plan.masks[m] for s, m in zip(a, ins.masks, strict=True)), np.zeros(self.plan.slots))
        elif ins.kind is Kind.ADD:
            v = np.sum(a, axis=0)
        elif ins.kind is Kind.ADD_PLAIN:
            v = a[0] + self.plan.masks[ins.masks[0]]
        elif ins.kind is Kind.SQUARE:
            v = a[0] * a[0]
        else:
            v = a[0] * a[1]
        regs[ins.dst] = v

    def run(self, inputs: Sequence[Array]) -> Array:
        """Logits from packed input vectors."""
        regs: dict[int, Array] = dict(enumerate(inputs))
        free = self.plan.free_after()
        for idx in range(len(self.plan.instrs)):
            self.apply(idx, regs)
            for r in free.get(idx, []):
                regs.pop(r, None)
        return np.array([regs[r][0] for r in self.plan.outputs])
