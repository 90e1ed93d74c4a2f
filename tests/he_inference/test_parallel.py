"""The worker pool's schedule, run on plain slots: every instruction runs, and the outputs are the plan's."""

from __future__ import annotations

import numpy as np

from he_inference.parallel import schedule
from he_inference.passes.cost import instr_cost
from he_inference.passes.interpret import SlotSimulator
from tests.he_inference.conftest import Compiled

SIM_TOL = 1e-9


def test_the_schedule_run_on_plain_slots_equals_the_plan(compiled: Compiled) -> None:
    x, model = compiled.images, compiled.model
    plan = model.plan
    sim = SlotSimulator(plan)
    want = sim.run(model.pack(x[0]))
    for workers in (2, 3):
        tasks = schedule(plan, workers, lambda i: instr_cost(plan, i, 3, 7))
        regs = [dict(enumerate(model.pack(x[0]))) for _ in range(workers)]
        files: dict[int, np.ndarray] = {}
        ran = set()
        for row in tasks:
            for k, t in enumerate(row):
                for r, _ in t.loads:
                    regs[k][r] = files[r]  # KeyError: loaded before its producer saved it
                for i in t.instrs:
                    sim.apply(i, regs[k])
                    ran.add(i)
            for k, t in enumerate(row):
                files.update({r: regs[k][r] for r in t.saves})
                for r in t.drop:
                    regs[k].pop(r, None)
        assert ran == set(range(len(plan.instrs)))
        got = np.array([files[r][0] for r in plan.outputs])
        np.testing.assert_allclose(got, want, atol=SIM_TOL, rtol=0)
        assert all(any(row[k].instrs for row in tasks) for k in range(workers))  # every worker gets work


def test_the_schedule_costs_instructions_at_the_models_own_levels(compiled: Compiled) -> None:
    model = compiled.model
    levels = model.levels

    tasks = schedule(model.plan, 2, lambda i: instr_cost(model.plan, i, levels.operand_level[i], levels.top))

    assert len(tasks) == len(model.plan.layers)
    assert {i for row in tasks for t in row for i in t.instrs} == set(range(len(model.plan.instrs)))
