"""The worker pool: its schedule run on plain slots, and real worker processes that die, fail or cannot start."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from federation.errors import HEError, WorkerLostError
from he_inference.client import decrypt_logits, encrypt_image
from he_inference.parallel import ParallelEngine, PoolHealth, PoolState, schedule
from he_inference.passes.cost import instr_cost
from he_inference.passes.interpret import SlotSimulator, run_plain
from tests.he_inference.conftest import Compiled
from tests.he_inference.tiny import TINY_HE_ATOL, tiny_compiled

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


# -- the pool survives its workers: real worker processes on the tiny ring -------------------------------------
LOST_BUDGET_S = 5.0     # a request whose worker is SIGKILLed fails within this (measured: about 0.1 to 0.3 s)
START_BUDGET_S = 60.0   # a pool whose workers cannot start says so within this (measured: under 1 s)
ERROR_LINE_CHARS = 300  # a worker's failure reaches the caller as one short line, never its traceback


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return tiny_compiled(tmp_path_factory.mktemp("tiny"))


def _assert_served(pool: ParallelEngine, tiny: Compiled) -> None:
    reply, _ = pool.infer(encrypt_image(tiny.model, tiny.keys, tiny.images[0]))
    ref = run_plain(tiny.net, tiny.images[:1])[0]
    np.testing.assert_allclose(decrypt_logits(tiny.model, tiny.keys, reply), ref, atol=TINY_HE_ATOL, rtol=0)


def _wait_until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_worker_killed_mid_request_fails_that_request_only_and_is_respawned(tiny: Compiled) -> None:
    upload = encrypt_image(tiny.model, tiny.keys, tiny.images[0])
    with ParallelEngine(tiny.model, tiny.path, tiny.keys.public(), workers=2) as pool:
        victim = pool.pids[1]
        assert victim is not None

        def kill_after_the_first_layer(_: str, done: int, total: int) -> None:
            if done == 1:
                os.kill(victim, signal.SIGKILL)

        t0 = time.perf_counter()
        with pytest.raises(WorkerLostError, match=r"HE worker 1 died during layer 1 \(exit code -9\)"):
            pool.infer(upload, progress=kill_after_the_first_layer)
        lost_s = time.perf_counter() - t0
        after_loss, pids = pool.health(), pool.pids
        _assert_served(pool, tiny)
        after_next = pool.health()

    assert lost_s < LOST_BUDGET_S
    assert (after_loss.respawns, after_loss.failures, after_loss.alive) == (1, 1, 2)
    assert victim not in pids
    assert None not in pids
    assert after_next == PoolHealth(workers=2, alive=2, respawns=1, state=PoolState.OK, passes=1, failures=1)


@pytest.mark.slow
def test_a_worker_killed_while_idle_is_respawned_for_the_next_request(tiny: Compiled) -> None:
    with ParallelEngine(tiny.model, tiny.path, tiny.keys.public(), workers=2) as pool:
        victim = pool.pids[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: pool.health().alive < 2 or pool.health().respawns == 1, LOST_BUDGET_S)

        _assert_served(pool, tiny)
        health = pool.health()

    assert (health.respawns, health.passes, health.failures, health.state) == (1, 1, 0, PoolState.OK)


def test_a_worker_failing_mid_pass_reports_one_line_stays_alive_and_the_pool_serves_the_next(tiny: Compiled) -> None:
    upload = encrypt_image(tiny.model, tiny.keys, tiny.images[0])
    with ParallelEngine(tiny.model, tiny.path, tiny.keys.public(), workers=2) as pool:
        pids = pool.pids
        assert any(load for row in pool.tasks[2:] for task in row for load in task.loads)  # layer 2 reads a transfer

        def corrupt_transfers(_: str, done: int, total: int) -> None:
            if done == 2:
                for path in pool.scratch.rglob("r*"):
                    path.write_bytes(b"not a ciphertext")

        with pytest.raises(HEError, match=r"HE worker \d failed at layer 2: ") as info:
            pool.infer(upload, progress=corrupt_transfers)
        _assert_served(pool, tiny)
        health, pids_after = pool.health(), pool.pids

    message = str(info.value)
    assert "Traceback" not in message
    assert "\n" not in message
    assert len(message) < ERROR_LINE_CHARS
    assert pids_after == pids   # nobody died, nobody was respawned
    assert health == PoolHealth(workers=2, alive=2, respawns=0, state=PoolState.OK, passes=1, failures=1)


def test_a_pool_whose_workers_hold_another_model_fails_to_start_naming_the_worker(tiny: Compiled,
                                                                                  tmp_path: Path) -> None:
    other = tmp_path / "other.he"
    dataclasses.replace(tiny.model, classes=("x", "y"), blob=None).save(other)
    corrupted = tmp_path / "corrupted.he"
    corrupted.write_bytes(tiny.path.read_bytes()[:-100])

    t0 = time.perf_counter()
    with pytest.raises(HEError, match=r"HE worker \d failed to start: HEError: .*other\.he is not the model this "
                                      r"server was given"):
        ParallelEngine(tiny.model, other, tiny.keys.public(), workers=2)
    with pytest.raises(HEError, match=r"HE worker \d failed to start: CiphertextError: .*corrupted\.he: not a "
                                      "privrad HE model"):
        ParallelEngine(tiny.model, corrupted, tiny.keys.public(), workers=2)
    with pytest.raises(HEError, match=r"HE worker \d did not answer within 0.001 s \(waiting for ready\)"):
        ParallelEngine(tiny.model, tiny.path, tiny.keys.public(), workers=2, start_timeout=0.001)

    assert time.perf_counter() - t0 < START_BUDGET_S
