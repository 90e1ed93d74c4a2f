"""The encrypted forward pass on several cores.

SEAL calls through ``tenseal.sealapi`` hold the GIL (threads gain nothing), so the plan is
split across worker processes. Per layer, the ciphertexts the layer hands on are divided
among the workers by estimated cost; each worker runs every instruction its share depends
on (cheap shared work such as a convolution's baby-step rotations is duplicated rather than
shipped), and a ciphertext a worker needs from another is written once to a RAM file by its
producer and read by the consumer. One barrier per layer; each worker pre-encodes only the
plaintexts of its own instructions, so memory is split too. The costs are the compiler's
cost model (:mod:`he_inference.passes.cost`) at the levels of the model's one level
assignment (:mod:`he_inference.passes.levels`), the same one every worker's engine uses.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import tenseal.sealapi as seal

from federation.errors import CiphertextError, HEError
from he_inference.artifact import CompiledModel
from he_inference.engine import Engine, LayerTiming
from he_inference.keys import PublicKeys, load_ciphertexts, require_keys_for
from he_inference.passes.cost import TRANSFER_COST, instr_cost
from he_inference.passes.program import Kind, Plan
from he_inference.serial import SCRATCH_DIR, ContainerKind, pack, unpack

__all__ = ["ParallelEngine", "WorkerMessage", "WorkerTask", "schedule"]


class WorkerMessage(enum.StrEnum):
    """The first element of every message between the coordinator and a worker."""

    READY = "ready"      # worker → coordinator: plaintexts encoded (seconds)
    KEYS = "keys"        # coordinator → worker: load evaluation keys (key id, file)
    OK = "ok"            # worker → coordinator: keys loaded
    FORGET = "forget"    # coordinator → worker: release a key id
    RUN = "run"          # coordinator → worker: a new pass (scratch folder, input file, key id)
    GO = "go"            # coordinator → worker: run layer n
    DONE = "done"        # worker → coordinator: layer n done (seconds, counts)
    STOP = "stop"        # coordinator → worker: exit
    ERROR = "error"      # worker → coordinator: a traceback


@dataclass(frozen=True)
class WorkerTask:
    """What one worker does in one layer: read ``loads`` (register, from worker), run ``instrs``, write ``saves``."""

    loads: tuple[tuple[int, int], ...] = ()
    instrs: tuple[int, ...] = ()
    saves: tuple[int, ...] = ()
    drop: tuple[int, ...] = ()


@dataclass
class _Draft:
    loads: list[tuple[int, int]] = field(default_factory=list)
    instrs: list[int] = field(default_factory=list)
    saves: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)


def schedule(plan: Plan, workers: int, cost: Callable[[int], float]) -> tuple[tuple[WorkerTask, ...], ...]:
    """Per layer, per worker: the instructions, transfers and releases (see the module docstring).

    Every instruction runs on at least one worker; the plan's outputs are saved by a worker
    holding them (the caller collects them).
    """
    producer: dict[int, int] = {}
    layer_of: dict[int, int] = {r: -1 for r in range(plan.n_inputs)}
    for li, (_, s, e) in enumerate(plan.layers):
        for idx in range(s, e):
            producer[plan.instrs[idx].dst] = idx
            layer_of[plan.instrs[idx].dst] = li
    last_read: dict[int, int] = {}
    for li, (_, s, e) in enumerate(plan.layers):
        for idx in range(s, e):
            for r in plan.instrs[idx].srcs:
                last_read[r] = li
    outputs = set(plan.outputs)
    where: dict[int, set[int]] = {r: set(range(workers)) for r in range(plan.n_inputs)}
    made: dict[int, set[int]] = {}
    tasks = [[_Draft() for _ in range(workers)] for _ in plan.layers]
    for li, (_, s, e) in enumerate(plan.layers):
        handed_on = [plan.instrs[i].dst for i in range(s, e)
                     if last_read.get(plan.instrs[i].dst, -1) > li or plan.instrs[i].dst in outputs]
        cones = {r: _cone(plan, producer, r, s) for r in handed_on}
        chosen: list[set[int]] = [set() for _ in range(workers)]
        load = [0.0] * workers
        for r in sorted(handed_on, key=lambda r: -sum(cost(i) for i in cones[r])):
            extra = [_added(plan, producer, where, cones[r] - chosen[k], s, k, cost) for k in range(workers)]
            k = min(range(workers), key=lambda k: (load[k] + extra[k], k))
            load[k] += extra[k]
            chosen[k] |= cones[r]
        for k in range(workers):
            t = tasks[li][k]
            t.instrs = sorted(chosen[k])
            ext = sorted({x for i in t.instrs for x in plan.instrs[i].srcs if x not in producer or producer[x] < s})
            for x in ext:
                if k not in where[x]:
                    src = min(made[x])  # a worker that computed it, in its own layer
                    t.loads.append((x, src))
                    tasks[layer_of[x]][src].saves.append(x)
                    where[x].add(k)
        for k in range(workers):
            for i in tasks[li][k].instrs:
                where.setdefault(plan.instrs[i].dst, set()).add(k)
                made.setdefault(plan.instrs[i].dst, set()).add(k)
    for r in plan.outputs:  # the caller collects every output from one worker's file
        k = min(made[r])
        tasks[layer_of[r]][k].saves.append(r)
    for r, li in layer_of.items():  # release a register after the last layer that reads or ships it
        end = max(last_read.get(r, li), li)
        for k in range(workers):
            tasks[end][k].drop.append(r)
    return tuple(tuple(WorkerTask(tuple(t.loads), tuple(t.instrs), tuple(sorted(set(t.saves))),
                                  tuple(sorted(set(t.drop) - set(t.saves) - outputs))) for t in row) for row in tasks)


def _added(plan: Plan, producer: dict[int, int], where: dict[int, set[int]], fresh: set[int], start: int, k: int,
           cost: Callable[[int], float]) -> float:
    """Cost for worker ``k`` to also run ``fresh``: the instructions plus the inputs it must fetch."""
    ext = {x for i in fresh for x in plan.instrs[i].srcs if x not in producer or producer[x] < start}
    return sum(cost(i) for i in fresh) + TRANSFER_COST * sum(k not in where[x] for x in ext)


def _cone(plan: Plan, producer: dict[int, int], reg: int, start: int) -> set[int]:
    """Instructions of the current layer (index >= start) that ``reg`` depends on."""
    out: set[int] = set()
    stack = [reg]
    while stack:
        r = stack.pop()
        idx = producer.get(r, -1)
        if idx < start or idx in out:
            continue
        out.add(idx)
        stack.extend(plan.instrs[idx].srcs)
    return out


# -- the worker process ----------------------------------------------------------------------
def _worker(conn: Connection, model_path: str, digest: str, keys_blob: bytes | None,
            tasks: tuple[WorkerTask, ...]) -> None:
    """One worker: its own column of the coordinator's schedule (one task per layer)."""
    try:
        model = CompiledModel.load(Path(model_path))
        if model.digest != digest:
            raise HEError(f"{model_path} is not the model this server was given")
        keysets = {} if keys_blob is None else {"": PublicKeys.from_bytes(keys_blob, model.params, source="keys")}
        engine = Engine(model, instrs={i for t in tasks for i in t.instrs})
        conn.send((WorkerMessage.READY, engine.encode_seconds))
        while True:
            msg = conn.recv()
            if msg[0] == WorkerMessage.STOP:
                return
            if msg[0] == WorkerMessage.KEYS:
                keysets[msg[1]] = PublicKeys.from_bytes(Path(msg[2]).read_bytes(), model.params, source="keys")
                conn.send((WorkerMessage.OK,))
                continue
            if msg[0] == WorkerMessage.FORGET:
                keysets.pop(msg[1], None)
                continue
            _, workdir, input_path, key_id = msg
            engine.use_keys(keysets[key_id])
            inputs = load_ciphertexts(Path(input_path).read_bytes(), ContainerKind.ENCRYPTED_IMAGE, model.params,
                                      engine.ctx, model_sha256=model.digest, source="upload")
            regs: dict[int, seal.Ciphertext] = dict(enumerate(inputs))
            for li, task in enumerate(tasks):
                if conn.recv() != (WorkerMessage.GO, li):
                    raise HEError("worker out of step with the coordinator")
                t0 = time.perf_counter()
                counts = Counter[Kind]()
                for r, _src in task.loads:
                    ct = seal.Ciphertext()
                    ct.load(engine.ctx, os.path.join(workdir, f"r{r}"))
                    regs[r] = ct
                engine.execute(regs, task.instrs, counts)
                for r in task.saves:
                    path = os.path.join(workdir, f"r{r}")
                    regs[r].save(path + ".tmp")
                    os.replace(path + ".tmp", path)
                for r in task.drop:
                    regs.pop(r, None)
                conn.send((WorkerMessage.DONE, li, time.perf_counter() - t0, dict(counts)))
            regs.clear()
    except (EOFError, KeyboardInterrupt):
        return
    except BaseException:  # report, then exit: the coordinator raises it
        conn.send((WorkerMessage.ERROR, traceback.format_exc()))


class ParallelEngine:
    """A pool of worker processes that run one compiled model's encrypted forward pass together.

    Use as a context manager; ``infer`` takes and returns the wire containers (bytes).
    """

    def __init__(self, model: CompiledModel, model_path: Path, keys: PublicKeys | None = None, *, workers: int = 2,
                 progress: Callable[[str], None] | None = None) -> None:
        """Start ``workers`` processes; each loads ``model_path``, which must hold ``model``."""
        self.model = model
        if keys is not None:
            keys = require_keys_for(keys, model.params, model.plan.steps)
        if workers < 1:
            raise HEError(f"workers must be ≥ 1, got {workers}")
        self.workers = workers
        plan, levels = model.plan, model.levels
        self.tasks = schedule(plan, workers, lambda i: instr_cost(plan, i, levels.operand_level[i], levels.top))
        self._tmp = tempfile.mkdtemp(prefix="privrad-he-run-", dir=SCRATCH_DIR)
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        blob = None if keys is None else keys.blob
        for k in range(workers):
            parent, child = ctx.Pipe()
            column = tuple(row[k] for row in self.tasks)
            proc = ctx.Process(target=_worker, args=(child, str(model_path), model.digest, blob, column), daemon=True)
            proc.start()
            child.close()  # so that a dead worker reads as EOF here
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            encode = [self._recv(k, WorkerMessage.READY)[1] for k in range(workers)]
        except BaseException:
            self.close()
            raise
        self.encode_seconds = max(encode)
        if progress is not None:
            progress(f"{workers} workers ready: plaintexts encoded in {self.encode_seconds:.1f} s")

    def _recv(self, k: int, kind: WorkerMessage) -> tuple[Any, ...]:
        try:
            while not self._conns[k].poll(1.0):
                if not self._procs[k].is_alive():
                    raise EOFError
            msg = self._conns[k].recv()
        except EOFError as exc:
            raise HEError(f"HE worker {k} died (exit code {self._procs[k].exitcode})") from exc
        if msg[0] == WorkerMessage.ERROR:
            raise HEError(f"HE worker {k} failed:\n{msg[1]}")
        if msg[0] != kind:
            raise HEError(f"HE worker {k}: unexpected {msg[0]!r}")
        return tuple(msg)

    def add_keys(self, key_id: str, keys: PublicKeys) -> None:
        """Load another client's evaluation keys into every worker, under ``key_id``."""
        keys = require_keys_for(keys, self.model.params, self.model.plan.steps)
        path = os.path.join(self._tmp, f"keys-{key_id or 'default'}")
        Path(path).write_bytes(keys.blob)   # once, in RAM, rather than pickled down every pipe
        try:
            for c in self._conns:
                c.send((WorkerMessage.KEYS, key_id, path))
            for k in range(self.workers):
                self._recv(k, WorkerMessage.OK)
        finally:
            os.unlink(path)

    def forget_keys(self, key_id: str) -> None:
        """Release a client's evaluation keys in every worker."""
        for c in self._conns:
            c.send((WorkerMessage.FORGET, key_id))

    def infer(self, upload: bytes, *, key_id: str = "", progress: Callable[[str, int, int], None] | None = None
              ) -> tuple[bytes, list[LayerTiming]]:
        """One encrypted classification: ``encrypted-image`` container in, ``encrypted-logits`` out.

        ``key_id`` selects keys given to :meth:`add_keys` (default: the keys the pool started with).
        """
        model = self.model
        _, parts = unpack(upload, ContainerKind.ENCRYPTED_IMAGE, source="upload", params_sha256=model.params.digest(),
                          model_sha256=model.digest)
        if len(parts) != model.plan.n_inputs:
            raise CiphertextError(f"upload: the model takes {model.plan.n_inputs} ciphertexts, got {len(parts)}")
        workdir = tempfile.mkdtemp(dir=self._tmp)
        try:
            input_path = os.path.join(workdir, "input")
            Path(input_path).write_bytes(upload)
            for c in self._conns:
                c.send((WorkerMessage.RUN, workdir, input_path, key_id))
            timings = []
            for li, (name, _, _) in enumerate(model.plan.layers):
                t0 = time.perf_counter()
                for c in self._conns:
                    c.send((WorkerMessage.GO, li))
                counts = Counter[Kind]()
                for k in range(self.workers):
                    counts.update(self._recv(k, WorkerMessage.DONE)[3])
                timings.append(LayerTiming(name, time.perf_counter() - t0, dict(counts)))
                if progress is not None:
                    progress(name, li + 1, len(model.plan.layers))
            out = [(f"ct{n}", Path(workdir, f"r{r}").read_bytes()) for n, r in enumerate(model.plan.outputs)]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return pack(ContainerKind.ENCRYPTED_LOGITS, out, params_sha256=model.params.digest(), model_sha256=model.digest,
                    classes=list(model.classes)), timings

    def close(self) -> None:
        """Stop the workers and remove the scratch directory."""
        for c in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send((WorkerMessage.STOP,))
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ParallelEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

