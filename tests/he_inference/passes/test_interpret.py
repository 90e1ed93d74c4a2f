"""The interpret pass: plaintext evaluation checked against PyTorch and numpy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from he_inference.passes.interpret import SlotSimulator, run_plain, value_ranges
from he_inference.passes.ir import Dense, InputTransform, Network, Norm
from he_inference.passes.layout import fresh_layout
from he_inference.passes.program import Instr, Kind, LayerSpan, Plan

EXACT_TOL = 1e-12   # float64 against float64


def test_a_normalisation_computes_what_an_eval_batchnorm_computes() -> None:
    bn = nn.BatchNorm2d(2).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.7]))
        bn.bias.copy_(torch.tensor([0.0, 0.3]))
    inv = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    norm = Norm("bn", bn.running_mean.numpy().copy(), inv, bn.bias.detach().numpy().copy())
    net = Network((2, 2, 2), InputTransform(), (norm,), Dense("fc", np.eye(8).reshape(8, 2, 2, 2), np.zeros(8)))
    x = np.random.default_rng(0).uniform(0, 1, (3, 2, 2, 2))

    got = run_plain(net, x)

    with torch.no_grad():
        ref = bn(torch.from_numpy(x)).flatten(1).numpy()
    np.testing.assert_allclose(got, ref, atol=EXACT_TOL, rtol=0)
    assert value_ranges(net, x)[0] == float(np.abs(x).max())


def test_the_slot_simulator_rotates_left_and_multiplies_by_masks() -> None:
    layout = fresh_layout((1, 2, 2), (1, 1), block=(2, 2), slots=4)
    masks = (np.array([1.0, 0, 0, 0]), np.array([0.0, 2, 0, 0]), np.full(4, 0.5))
    instrs = (Instr(Kind.ROT, 1, (0,), step=1), Instr(Kind.MULACC, 2, (0, 1), (0, 1)),
              Instr(Kind.SQUARE, 3, (2,)), Instr(Kind.ADD_PLAIN, 4, (3,), (2,)))
    plan = Plan(4, layout, instrs, masks, (4,), (LayerSpan("all", 0, 4),), 5)
    v = np.array([3.0, 5.0, 7.0, 11.0])

    got = SlotSimulator(plan).run([v])

    rotated = np.roll(v, -1)
    np.testing.assert_allclose(got, [(v[0] * 1 + rotated[0] * 0) ** 2 + 0.5], atol=EXACT_TOL)
    regs = {0: v}
    for idx in range(len(instrs)):
        SlotSimulator(plan).apply(idx, regs)
    np.testing.assert_allclose(regs[2], v * masks[0] + rotated * masks[1], atol=EXACT_TOL)
