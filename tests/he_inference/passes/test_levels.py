"""The levels pass: golden values on a hand-written plan, and SEAL's own levels and scales on a tiny ring."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch import nn

from federation.errors import CiphertextError
from federation.model import PolyAct
from he_inference.artifact import CompiledModel
from he_inference.ckks import CKKSParams
from he_inference.engine import Engine
from he_inference.keys import SecretKeys, load_ciphertexts, pack_ciphertexts
from he_inference.passes.fold import fold
from he_inference.passes.interpret import run_plain, value_ranges
from he_inference.passes.ir import Network
from he_inference.passes.layout import choose_packing, fresh_layout
from he_inference.passes.levels import assign_levels, plan_depth, register_depths
from he_inference.passes.lower import lower
from he_inference.passes.program import Instr, Kind, LayerSpan, Plan
from he_inference.passes.trace import trace
from he_inference.serial import ContainerKind
from tests.he_inference.models import seeded

SCALE_REL_TOL = 1e-12     # scales are float64 products of primes: equal up to rounding
TINY_HE_ATOL = 5e-4       # CKKS error at a 35-bit scale is absolute: over 25 fresh key sets median 5.1e-5, max 1.4e-4
TINY = CKKSParams(8192, (50, 35, 35, 35, 50), 35)   # 205 bits: three levels, 128-bit secure at N = 8192


def _hand_plan() -> Plan:
    """r1 = rot(r0), r2 = r0 m0 + r1 m1, r3 = r2², r4 = r3 + r2, r5 = r4 + m2."""
    layout = fresh_layout((1, 2, 2), (1, 1), block=(2, 2), slots=8)
    instrs = (Instr(Kind.ROT, 1, (0,), step=1), Instr(Kind.MULACC, 2, (0, 1), (0, 1)), Instr(Kind.SQUARE, 3, (2,)),
              Instr(Kind.ADD, 4, (3, 2)), Instr(Kind.ADD_PLAIN, 5, (4,), (2,)))
    return Plan(8, layout, instrs, tuple(np.ones(8) for _ in range(3)), (5,), (LayerSpan("all", 0, 5),), 6)


def test_depths_count_the_rescales_behind_each_register() -> None:
    plan = _hand_plan()

    assert register_depths(plan) == (0, 0, 1, 2, 2, 2)
    assert plan_depth(plan) == 2


def test_levels_and_scales_of_a_hand_written_plan_are_the_golden_ones() -> None:
    primes, delta = (5, 7, 11), 4.0

    levels = assign_levels(_hand_plan(), primes=primes, scale=delta)

    assert levels.top == 2
    assert levels.operand_level == (2, 2, 1, 0, 0)
    assert levels.mask_at[1] == ((2, 11 * 4.0 / 4.0), (2, 11 * 4.0 / 4.0))
    assert levels.mask_at[4] == ((0, 4.0**2 / 7),)   # the square's scale, carried through the add
    assert levels.output_scales == (4.0**2 / 7,)
    assert levels.depth == 2


def test_a_plan_deeper_than_the_chain_is_refused() -> None:
    with pytest.raises(CiphertextError, match="plan needs more levels than the 2-prime chain provides"):
        assign_levels(_hand_plan(), primes=(5, 7), scale=4.0)


def _tiny_model() -> tuple[CompiledModel, Network]:
    model = seeded(4, lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2),
                                            nn.Flatten(), nn.Linear(2 * 8 * 8, 2)).eval())
    net = fold(trace(model, image_shape=(1, 8, 8)))
    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 8, 8))
    plan = lower(net, packing=choose_packing(net, slots=TINY.slots), ranges=value_ranges(net, x))
    model = CompiledModel.assemble(TINY, plan, image_shape=(1, 8, 8), transform=net.transform, classes=(),
                                   calibrated_max=max(value_ranges(net, x)))
    return model, net


def test_the_assigned_levels_and_scales_are_those_seal_reaches_on_a_tiny_ring() -> None:
    model, net = _tiny_model()
    keys = SecretKeys.generate(model.params, model.plan.steps)
    engine = Engine(model, keys.public())
    image = np.random.default_rng(0).uniform(0, 1, (1, 8, 8))
    upload = keys.encrypt(model.pack(image), model_sha256=model.digest)
    regs = dict(enumerate(load_ciphertexts(upload, ContainerKind.ENCRYPTED_IMAGE, model.params, engine.ctx,
                                           model_sha256=model.digest)))
    primes = [int(engine.ctx.get_context_data(engine.ctx.first_parms_id()).parms().coeff_modulus()[i].value())
              for i in range(len(model.params.coeff_bits) - 1)]
    levels = model.levels
    level_seen, scale_seen = {r: engine.level_of(ct) for r, ct in regs.items()}, {r: ct.scale for r, ct in regs.items()}

    for idx, ins in enumerate(model.plan.instrs):
        assert levels.operand_level[idx] == min(level_seen[s] for s in ins.srcs), idx
        for pos, (lv, sc) in enumerate(levels.mask_at[idx]):
            assert lv == levels.operand_level[idx]
            if ins.kind is Kind.MULACC:   # mask scale x operand scale / dropped prime = Δ
                assert sc * scale_seen[ins.srcs[pos]] / primes[lv] == pytest.approx(model.params.scale,
                                                                                   rel=SCALE_REL_TOL)
            else:
                assert sc == pytest.approx(scale_seen[ins.srcs[0]], rel=SCALE_REL_TOL)
        engine.execute(regs, (idx,), Counter())
        level_seen[ins.dst], scale_seen[ins.dst] = engine.level_of(regs[ins.dst]), regs[ins.dst].scale

    assert [scale_seen[r] for r in model.plan.outputs] == pytest.approx(list(levels.output_scales),
                                                                        rel=SCALE_REL_TOL)
    assert levels.top - min(level_seen[r] for r in model.plan.outputs) == levels.depth == 3
    reply = pack_ciphertexts([regs[r] for r in model.plan.outputs], ContainerKind.ENCRYPTED_LOGITS, model.params,
                             model_sha256=model.digest)
    ref = run_plain(net, image[None])[0]
    np.testing.assert_allclose(keys.decrypt(reply, model_sha256=model.digest), ref,
                               atol=TINY_HE_ATOL, rtol=0)
