"""The lowering pass: the plan, run on plain slots, computes what the network computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from federation.errors import UnsupportedLayerError
from federation.model import ArchConfig, build_model
from he_inference.passes.fold import fold
from he_inference.passes.interpret import SlotSimulator, run_plain, value_ranges
from he_inference.passes.ir import Conv, Network
from he_inference.passes.layout import choose_packing
from he_inference.passes.lower import lower, zero_threshold
from he_inference.passes.program import Kind, Plan
from he_inference.passes.trace import trace
from tests.he_inference.models import CASES, custom, images, perturbed

SIM_TOL = 1e-9          # the slot simulator is exact up to float64 rounding
SLOTS = 8192


def _plan(net: Network, x: np.ndarray) -> Plan:
    return lower(net, packing=choose_packing(net, slots=SLOTS), ranges=value_ranges(net, x))


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_the_packed_plan_on_plain_slots_equals_the_network(make, shape) -> None:  # type: ignore[no-untyped-def]
    net = fold(trace(make(), image_shape=shape))
    x = images(shape)
    plan = _plan(net, x)
    sim = SlotSimulator(plan)

    got = np.stack([sim.run(plan.input_layout.pack(net.transform.apply(x[i:i + 1])[0], SLOTS)) for i in range(2)])

    ref = run_plain(net, x)
    np.testing.assert_allclose(got, ref, atol=SIM_TOL * max(1.0, np.abs(ref).max()), rtol=0)


def test_the_plan_is_frozen_and_lists_every_layer_in_order() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    plan = _plan(net, images((1, 16, 16)))

    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slots = 1  # type: ignore[misc]
    assert isinstance(plan.instrs, tuple)
    assert [span.name for span in plan.layers] == ["0", "2", "3", "4.body.0", "4.body.1", "6"]
    assert plan.layers[-1].end == len(plan.instrs)
    assert plan.steps == tuple(sorted({i.step for i in plan.instrs if i.kind is Kind.ROT}))


def test_lowering_the_same_network_twice_gives_the_same_plan() -> None:
    net = fold(trace(custom(5, 2, 3), image_shape=(1, 16, 16)))
    x = images((1, 16, 16))

    first, second = _plan(net, x), _plan(net, x)

    assert first.instrs == second.instrs
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, second.masks, strict=True))


def test_an_unfolded_normalisation_is_refused() -> None:
    net = trace(custom(3, 1, 2), image_shape=(1, 16, 16))

    with pytest.raises(UnsupportedLayerError, match=r"^1 \(BatchNorm2d\): not folded"):
        _plan(net, images((1, 16, 16)))


def test_a_plan_whose_layers_leave_a_gap_is_refused_by_field() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    plan = _plan(net, images((1, 16, 16)))

    with pytest.raises(ValueError, match="`layers` must cover the instructions in order"):
        dataclasses.replace(plan, layers=plan.layers[1:])


def test_a_mask_below_the_zero_plaintext_threshold_is_dropped_and_the_plan_still_matches() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    x = images((1, 16, 16))
    ranges = value_ranges(net, x)
    conv = net.ops[0]
    assert isinstance(conv, Conv)
    tiny = dataclasses.replace(conv, weight=conv.weight.copy())
    tiny.weight[0, 0, 0, 0] = 1e-20      # one tap far below CKKS's resolution: its mask would encode to zero
    net = dataclasses.replace(net, ops=(tiny, *net.ops[1:]))
    packing = choose_packing(net, slots=SLOTS)
    kept, dropped = lower(net, packing=packing, ranges=ranges), lower(net, packing=packing, ranges=ranges,
                                                                        zero_below=zero_threshold(2 * SLOTS, 40))

    assert min(np.abs(m).max() for m in kept.masks if np.any(m)) < 1e-19
    assert all(np.abs(dropped.masks[m]).max() >= zero_threshold(2 * SLOTS, 40)
               for ins in dropped.instrs if ins.kind is Kind.MULACC for m in ins.masks)
    got = SlotSimulator(dropped).run(dropped.input_layout.pack(net.transform.apply(x[:1])[0], SLOTS))
    np.testing.assert_allclose(got, run_plain(net, x[:1])[0], atol=SIM_TOL * max(1.0, np.abs(got).max()), rtol=0)


def test_an_output_no_weight_reaches_is_refused_with_the_layer_and_channels() -> None:
    net = fold(trace(custom(3, 1, 2), image_shape=(1, 16, 16)))
    conv = net.ops[0]
    assert isinstance(conv, Conv)
    dead = dataclasses.replace(conv, weight=np.zeros_like(conv.weight))
    net = dataclasses.replace(net, ops=(dead, *net.ops[1:]))

    with pytest.raises(UnsupportedLayerError, match=r"^0: output channels 0–2 do not depend on the input"):
        _plan(net, images((1, 16, 16)))


def test_the_zero_plaintext_threshold_is_where_encoding_can_first_round_to_zero() -> None:
    import tenseal.sealapi as seal

    from he_inference.ckks import CKKSParams, make_context

    params = CKKSParams(8192, (60, 40, 60), 40)
    ctx = make_context(params)
    encoder = seal.CKKSEncoder(ctx)
    tol = zero_threshold(params.poly_degree, params.scale_bits)

    def zero(v: np.ndarray) -> bool:
        pt = seal.Plaintext()
        encoder.encode(v.tolist(), params.scale, pt)
        return bool(pt.is_zero())

    one_slot = np.zeros(params.slots)
    one_slot[7] = tol
    assert not zero(one_slot)                       # at the threshold: never zero (the sparsest mask)
    one_slot[7] = tol / 1e4
    assert zero(one_slot)                           # far below it: a zero plaintext, which SEAL refuses to multiply


def test_two_residual_units_of_two_convolutions_lower_to_a_plan_that_equals_the_network() -> None:
    model = perturbed(build_model(ArchConfig(input_size=16, channels=(3, 5), head="flatten", residual=True,
                                             res_blocks=2, res_convs=2), seed=3), 3)
    net = fold(trace(model))
    x = images((1, 16, 16))
    plan = _plan(net, x)

    got = SlotSimulator(plan).run(plan.input_layout.pack(net.transform.apply(x[:1])[0], SLOTS))

    ref = run_plain(net, x[:1])[0]
    np.testing.assert_allclose(got, ref, atol=SIM_TOL * max(1.0, np.abs(ref).max()), rtol=0)
    assert sum(name.endswith(".body.2") for name, _, _ in plan.layers) == 2   # each body's second conv
