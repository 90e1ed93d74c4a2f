"""The layout pass: where every value sits in the slots, checked by packing and unpacking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from torch import nn

from federation.errors import DepthError, UnsupportedLayerError
from federation.model import PolyAct
from he_inference.passes.fold import fold
from he_inference.passes.layout import Layout, base_block, choose_packing, fresh_layout, pooled
from he_inference.passes.trace import trace
from tests.he_inference.models import custom


def test_packing_then_unpacking_gives_back_the_tensor() -> None:
    layout = fresh_layout((5, 4, 4), (2, 2), block=(8, 8), slots=128)
    x = np.random.default_rng(0).normal(size=(5, 4, 4))

    vectors = layout.pack(x, 128)

    assert len(vectors) == layout.n_ct == 1   # 2 blocks of 4 multiplexed channels hold 5
    np.testing.assert_array_equal(layout.unpack(vectors), x)
    assert sum(int(np.count_nonzero(v)) for v in vectors) == x.size


def test_multiplexed_channels_never_share_a_slot() -> None:
    layout = fresh_layout((8, 4, 4), (2, 2), block=(8, 8), slots=64)

    used = np.concatenate([layout.slots(c).ravel() + 64 * layout.ct[c] for c in range(8)])

    assert len(set(used.tolist())) == used.size
    assert layout.n_ct == 2


def test_a_pooled_layout_keeps_the_slots_and_widens_the_gap() -> None:
    layout = fresh_layout((2, 8, 8), (1, 1), block=(8, 8), slots=128)

    out = pooled(layout, (2, 2))

    assert out.shape == (2, 4, 4)
    assert out.gap == (2, 2)
    assert (out.ct, out.offset) == (layout.ct, layout.offset)
    np.testing.assert_array_equal(out.slots(1), layout.slots(1)[::2, ::2])


def test_the_block_holds_the_widest_tensor_of_the_network() -> None:
    net = fold(trace(custom(5, 2, 3), image_shape=(1, 16, 16)))

    assert base_block(net) == (16, 16)
    assert choose_packing(net, slots=4096).input.shape == net.input_shape


def test_a_channel_larger_than_a_ciphertext_is_refused_with_the_figures() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2), nn.Flatten(),
                          nn.Linear(2 * 128 * 128, 2)).eval()
    net = fold(trace(model, image_shape=(1, 128, 128)))

    with pytest.raises(DepthError, match=r"a 128x128 channel needs 16384 slots, a ciphertext has 8192"):
        choose_packing(net, slots=8192)


def test_a_layout_with_a_missing_channel_is_refused_by_field() -> None:
    with pytest.raises(ValueError, match=r"`ct` and `offset` must give one entry per channel \(3\)"):
        Layout((3, 4, 4), (1, 1), 4, (0, 0), (0, 16))


def test_every_op_gets_an_output_layout_and_a_residual_body_ends_where_it_began() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))

    packing = choose_packing(net, slots=4096)

    assert set(packing.outputs) == {"0", "2", "3", "4", "4.body.0", "4.body.1"}
    assert packing.outputs["4.body.0"] == packing.outputs["3"]   # the body's last conv writes the residual's input
    assert packing.outputs["3"] == pooled(packing.outputs["2"], (2, 2))
    assert packing.outputs["0"].shape == (3, 16, 16)


def test_two_layers_with_one_name_are_refused() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    twice = dataclasses.replace(net, ops=(*net.ops, net.ops[-1]))

    with pytest.raises(UnsupportedLayerError, match=r"^4: two layers have this name"):
        choose_packing(twice, slots=4096)
