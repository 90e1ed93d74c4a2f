"""Pass 3, layout: where every value of a (C, H, W) tensor sits in the slots of the ciphertexts (pure).

Every ciphertext has ``S`` slots. A base grid of ``Hb x Wb`` slots (one *block*) holds a
channel at full resolution; a ciphertext holds ``S // (Hb Wb)`` blocks. After a pool or a
strided convolution by ``k`` a channel keeps its block but uses only every k-th row and
column (its *gap* grows by k). The next convolution writes its output *multiplexed*:
``gap_y x gap_x`` channels interleave in one block, each on its own sub-lattice, so the
slots stay full (Lee et al., ICML 2022). Channel ``c`` pixel ``(y, x)`` sits at
``offset[c] + y gap_y Wb + x gap_x`` of ciphertext ``ct[c]``.

:func:`choose_packing` is the pass: the block a network needs, the layout of what the
client encrypts, and the layout every op writes its output in (a convolution: a fresh
multiplexed layout, or, as the last convolution of a residual body, the layout of the
residual's input so that the two terms add slot by slot; a pool: the same slots at a wider
gap; an activation: its input's). The lowering pass only reads these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from federation.errors import DepthError, UnsupportedLayerError
from he_inference.passes.ir import Array, AvgPool, Conv, InputTransform, Network, Op, Residual, Shape

__all__ = ["Layout", "Packing", "base_block", "choose_packing", "fresh_layout", "pack_image", "pooled"]


@dataclass(frozen=True)
class Layout:
    """Where each channel of a (C, H, W) tensor lives (see the module docstring)."""

    shape: Shape
    gap: tuple[int, int]
    row: int                      # Wb: slot distance between base rows
    ct: tuple[int, ...]           # ciphertext index of each channel
    offset: tuple[int, ...]       # first slot of each channel

    def __post_init__(self) -> None:
        if not len(self.ct) == len(self.offset) == self.shape[0]:
            raise ValueError(f"`ct` and `offset` must give one entry per channel ({self.shape[0]}), got "
                             f"{len(self.ct)} and {len(self.offset)}")
        if min(self.gap) < 1 or self.row < 1:
            raise ValueError(f"`gap` and `row` must be ≥ 1, got {self.gap} and {self.row}")

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


@dataclass(frozen=True)
class Packing:
    """The layout pass's result: slots per ciphertext, the base block, where the input and every op's output sit.

    ``outputs`` maps each op's name (residual bodies included) to the layout of its output.
    """

    slots: int
    block: tuple[int, int]
    input: Layout
    outputs: Mapping[str, Layout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block[0] * self.block[1] > self.slots:
            raise ValueError(f"`block` {self.block} needs more than the {self.slots} `slots`")


def fresh_layout(shape: Shape, gap: tuple[int, int], *, block: tuple[int, int], slots: int) -> Layout:
    """A dense layout: channels fill blocks, each block multiplexing ``gap_y x gap_x`` channels."""
    hb, wb = block
    blocks = slots // (hb * wb)
    positions = [b * hb * wb + oy * wb + ox for b in range(blocks) for oy in range(gap[0]) for ox in range(gap[1])]
    per_ct = len(positions)
    c = shape[0]
    return Layout(shape, gap, wb, tuple(i // per_ct for i in range(c)),
                  tuple(positions[i % per_ct] for i in range(c)))


def pooled(layout: Layout, kernel: tuple[int, int]) -> Layout:
    """The layout after an average pool by ``kernel``: same blocks, a wider gap."""
    c, h, w = layout.shape
    kh, kw = kernel
    return Layout((c, h // kh, w // kw), (layout.gap[0] * kh, layout.gap[1] * kw), layout.row, layout.ct,
                  layout.offset)


def base_block(net: Network) -> tuple[int, int]:
    """Base grid: the largest (H gap_y, W gap_x) any tensor of the network needs."""
    hb, wb = net.input_shape[1:]

    def visit(ops: Sequence[Op], shape: Shape, gap: tuple[int, int]) -> None:
        nonlocal hb, wb
        for op in ops:
            if isinstance(op, Conv):
                shape, gap = op.out_shape(shape), (gap[0] * op.stride[0], gap[1] * op.stride[1])
            elif isinstance(op, AvgPool):
                shape, gap = op.out_shape(shape), (gap[0] * op.kernel[0], gap[1] * op.kernel[1])
            elif isinstance(op, Residual):
                visit(op.body, shape, gap)
            hb, wb = max(hb, shape[1] * gap[0]), max(wb, shape[2] * gap[1])

    visit(net.ops, net.input_shape, (1, 1))
    return hb, wb


def _assign(ops: Sequence[Op], layout: Layout, target: Layout | None, *, block: tuple[int, int], slots: int,
            out: dict[str, Layout]) -> Layout:
    """Record the output layout of every op of ``ops`` read from ``layout``; the last convolution writes ``target``."""
    last_conv = max((i for i, o in enumerate(ops) if isinstance(o, Conv)), default=-1)
    for idx, op in enumerate(ops):
        if op.name in out:
            raise UnsupportedLayerError(f"{op.name}: two layers have this name; layouts are looked up by name")
        if isinstance(op, Conv):
            gap = (layout.gap[0] * op.stride[0], layout.gap[1] * op.stride[1])
            if target is not None and idx == last_conv:
                layout = target
            else:
                layout = fresh_layout(op.out_shape(layout.shape), gap, block=block, slots=slots)
        elif isinstance(op, AvgPool):
            layout = pooled(layout, op.kernel)
        elif isinstance(op, Residual):
            _assign(op.body, layout, layout, block=block, slots=slots, out=out)
        out[op.name] = layout
    return layout


def choose_packing(net: Network, *, slots: int) -> Packing:
    """The block ``net`` needs, the input layout and every op's output layout, for ciphertexts of ``slots`` slots.

    Raises
    ------
    DepthError
        One channel at full resolution does not fit in a ciphertext.
    UnsupportedLayerError
        Two layers share a name.
    """
    block = base_block(net)
    if block[0] * block[1] > slots:
        raise DepthError(f"a {block[0]}x{block[1]} channel needs {block[0] * block[1]} slots, a ciphertext has "
                         f"{slots}: use a patchify first convolution (kernel = stride) or a larger ring")
    inp = fresh_layout(net.input_shape, (1, 1), block=block, slots=slots)
    outputs: dict[str, Layout] = {}
    _assign(net.ops, inp, None, block=block, slots=slots, out=outputs)
    return Packing(slots, block, inp, outputs)


def pack_image(image: Array, transform: InputTransform, layout: Layout, slots: int) -> list[Array]:
    """Slot vectors of one image (C, H, W) in [0, 1], ready to encode (the client's side)."""
    x = transform.apply(np.asarray(image, dtype=np.float64)[None])[0]
    return layout.pack(x, slots)
