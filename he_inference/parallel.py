"""The encrypted forward pass on several cores, on a pool that survives its input.

SEAL calls through ``tenseal.sealapi`` hold the GIL (threads gain nothing), so the plan is
split across worker processes. Per layer, the ciphertexts the layer hands on are divided
among the workers by estimated cost; each worker runs every instruction its share depends
on (cheap shared work such as a convolution's baby-step rotations is duplicated rather than
shipped), and a ciphertext a worker needs from another is written once to a RAM file by its
producer and read by the consumer. One barrier per layer; each worker pre-encodes only the
plaintexts of its own instructions, so memory is split too. The costs are the compiler's
cost model (:mod:`he_inference.passes.cost`) at the levels of the model's one level
assignment (:mod:`he_inference.passes.levels`), the same one every worker's engine uses.

Robustness. The coordinator validates every upload (:func:`~he_inference.keys.load_upload`)
before a worker sees it. A worker whose pass fails anyway answers ``ERROR`` with a short
message (the traceback goes to this module's log) and stays alive; the coordinator then
sends ``ABORT`` to every worker, so all reset, and the replies still owed are drained
before the next pass. A worker that dies (SIGKILL, out of memory) fails the request with
:class:`~federation.errors.WorkerLostError`; it is respawned at once (it re-encodes its
plaintexts and re-loads every registered key set, which the coordinator keeps) and the next
request waits for it. A worker that fails or dies while starting is not respawned: the pool
start (or the next request) raises an :class:`~federation.errors.HEError` naming the worker,
its exit code or first error line, within ``start_timeout``. Workers are forked from a
``forkserver`` that has imported this module once, so a respawn costs the model load and the
encoding, not the imports. :meth:`ParallelEngine.health` reports a :class:`PoolHealth`.

Protocol, per worker (coordinator → worker / worker → coordinator)::

    start ─► READY · KEYS ─► OK (or ERROR) · FORGET · STOP
    RUN, then per layer n: GO n ─► DONE n (or ERROR n) · ABORT (after any ERROR or loss) · after the last DONE: idle
"""

from __future__ import annotations

import contextlib
import enum
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import tenseal.sealapi as seal

import federation.errors as errors
from federation.errors import HEError, KeyMaterialError, WorkerLostError
from he_inference.artifact import CompiledModel
from he_inference.ckks import make_context
from he_inference.engine import Engine, LayerTiming
from he_inference.keys import PublicKeys, load_upload, require_keys_for
from he_inference.passes.cost import TRANSFER_COST, instr_cost
from he_inference.passes.program import Kind, Plan
from he_inference.passes.rotkeys import step_switches
from he_inference.serial import SCRATCH_DIR, ContainerKind, pack

__all__ = ["START_TIMEOUT_S", "ParallelEngine", "PoolHealth", "PoolState", "WorkerMessage", "WorkerTask", "schedule"]

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0   # default bound on one worker's start: model load, plaintext encoding, key sets
ERROR_CHARS = 200         # a worker's error message, as it may reach a client: one line, this long at most
STOP_GRACE_S = 10.0       # close(): how long a worker may take to exit before it is killed
OUT_OF_STEP_EXIT = 3      # a worker's exit code when a message breaks the protocol (it is respawned)


class WorkerMessage(enum.StrEnum):
    """The first element of every message between the coordinator and a worker."""

    READY = "ready"      # worker → coordinator: plaintexts encoded (seconds)
    KEYS = "keys"        # coordinator → worker: load evaluation keys (key id, file)
    OK = "ok"            # worker → coordinator: keys loaded
    FORGET = "forget"    # coordinator → worker: release a key id
    RUN = "run"          # coordinator → worker: a new pass (scratch folder, input file, key id)
    GO = "go"            # coordinator → worker: run layer n
    DONE = "done"        # worker → coordinator: layer n done (seconds, counts)
    ABORT = "abort"      # coordinator → worker: drop the current pass, wait for the next
    STOP = "stop"        # coordinator → worker: exit
    ERROR = "error"      # worker → coordinator: (layer or None, exception class, one line, traceback)


class PoolState(enum.StrEnum):
    """How a pool stands: every worker ready, a replacement starting, or a worker lost for good."""

    OK = "ok"
    RESTARTING = "restarting"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class PoolHealth:
    """A pool's (or a one-process server's) state and counters since it started."""

    workers: int        # how many it should have
    alive: int          # worker processes running now
    respawns: int       # workers replaced after they died
    state: PoolState
    passes: int         # encrypted passes answered
    failures: int       # passes that failed (a refused upload is not a pass)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``state`` as its string)."""
        return {**asdict(self), "state": str(self.state)}


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
def _report(conn: Connection, layer: int | None, exc: BaseException) -> None:
    """Send ERROR: the exception's class, its first line (short), and the traceback for the coordinator's log."""
    line = (str(exc).strip().splitlines() or [""])[0][:ERROR_CHARS]
    conn.send((WorkerMessage.ERROR, layer, type(exc).__name__, line, "".join(traceback.format_exception(exc))))


def _worker(conn: Connection, model_path: str, digest: str, tasks: tuple[WorkerTask, ...]) -> None:
    """One worker: its own column of the coordinator's schedule (one task per layer)."""
    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C reaches the whole process group: the coordinator stops us
        _serve(conn, model_path, digest, tasks)


def _serve(conn: Connection, model_path: str, digest: str, tasks: tuple[WorkerTask, ...]) -> None:
    """Start (load the model, encode this worker's plaintexts), then answer the coordinator until STOP."""
    try:
        model = CompiledModel.load(Path(model_path))
        if model.digest != digest:
            raise HEError(f"{model_path} is not the model this server was given (sha256 {model.digest[:12]}…)")
        engine = Engine(model, instrs={i for t in tasks for i in t.instrs})
    except Exception as exc:  # report, then exit: the coordinator names it
        _report(conn, None, exc)
        return
    conn.send((WorkerMessage.READY, engine.encode_seconds))
    keysets: dict[str, PublicKeys] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == WorkerMessage.STOP:
            return
        if msg[0] == WorkerMessage.KEYS:
            try:
                keysets[msg[1]] = PublicKeys.from_bytes(Path(msg[2]).read_bytes(), model.params, source="keys")
            except Exception as exc:
                _report(conn, None, exc)
            else:
                conn.send((WorkerMessage.OK,))
        elif msg[0] == WorkerMessage.FORGET:
            keysets.pop(msg[1], None)
        elif msg[0] == WorkerMessage.RUN:
            _one_pass(conn, engine, keysets, tasks, msg[1], msg[2], msg[3])
        elif msg[0] != WorkerMessage.ABORT:   # an ABORT between passes is harmless
            sys.exit(OUT_OF_STEP_EXIT)


def _one_pass(conn: Connection, engine: Engine, keysets: dict[str, PublicKeys], tasks: tuple[WorkerTask, ...],
              workdir: str, input_path: str, key_id: str) -> None:
    """One encrypted pass, layer by layer on GO; any error is reported (once per GO) and the pass waits for ABORT."""
    model = engine.model
    regs: dict[int, seal.Ciphertext] = {}
    failed: Exception | None = None
    try:
        if key_id not in keysets:
            raise KeyMaterialError(f"no evaluation keys under {key_id[:32]!r} in this worker")
        engine.use_keys(keysets[key_id])
        regs = dict(enumerate(load_upload(Path(input_path).read_bytes(), model.params, engine.ctx,
                                          model_sha256=model.digest, n_inputs=model.plan.n_inputs)))
    except Exception as exc:
        failed = exc
    while True:
        msg = conn.recv()
        if msg[0] == WorkerMessage.ABORT:
            return
        if msg[0] != WorkerMessage.GO:
            sys.exit(OUT_OF_STEP_EXIT)
        li = int(msg[1])
        if failed is None:
            try:
                conn.send((WorkerMessage.DONE, li, *_one_layer(engine, regs, tasks[li], workdir)))
            except Exception as exc:
                failed = exc
        if failed is not None:
            _report(conn, li, failed)
        elif li == len(tasks) - 1:
            return


def _one_layer(engine: Engine, regs: dict[int, seal.Ciphertext], task: WorkerTask, workdir: str
               ) -> tuple[float, dict[Kind, int]]:
    """Load what this worker needs from others, run its instructions, save what others need, drop the rest."""
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
    return time.perf_counter() - t0, dict(counts)


# -- the coordinator ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Worker:
    """The coordinator's handle on one worker process and the replies it still owes, in order."""

    index: int
    proc: BaseProcess
    conn: Connection
    owed: deque[WorkerMessage] = field(default_factory=deque)
    ready: bool = False
    gone: bool = False        # its process ended and was reaped
    broken: str = ""          # why it cannot serve (failed or died while starting): not respawned

    def send(self, *msg: Any) -> None:
        """Send, ignoring a pipe its dead process closed (the death is handled where it is seen)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            self.conn.send(msg)


def _error_class(name: str) -> type[HEError]:
    """The named HEError subclass a worker raised, or HEError for anything else."""
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, HEError) else HEError


class ParallelEngine:
    """A pool of worker processes that run one compiled model's encrypted forward pass together.

    Use as a context manager; ``infer`` takes and returns the wire containers (bytes). Calls
    are serialised by an internal lock (one pass at a time: each already uses every worker);
    :meth:`health` never waits for a pass.
    """

    def __init__(self, model: CompiledModel, model_path: Path, keys: PublicKeys | None = None, *, workers: int = 2,
                 progress: Callable[[str], None] | None = None, start_timeout: float = START_TIMEOUT_S) -> None:
        """Start ``workers`` processes; each loads ``model_path``, which must hold ``model``.

        Raises
        ------
        HEError
            A worker failed, died or did not get ready within ``start_timeout`` seconds
            (names the worker and its exit code or first error line); no process is left.
        """
        self.model = model
        if keys is not None:
            keys = require_keys_for(keys, model.params, model.plan.steps)
        if workers < 1:
            raise HEError(f"workers must be ≥ 1, got {workers}")
        if not start_timeout > 0:
            raise HEError(f"start_timeout must be > 0 seconds, got {start_timeout}")
        self.workers, self.start_timeout = workers, float(start_timeout)
        self.model_path = str(model_path)
        plan, levels = model.plan, model.levels
        switches = {s: step_switches(s, model.key_steps, plan.slots) or 1 for s in plan.steps}
        self.tasks = schedule(plan, workers, lambda i: instr_cost(plan, i, levels.operand_level[i], levels.top,
                                                                  switches=switches.get(plan.instrs[i].step, 1)))
        self._context = make_context(model.params)   # the coordinator's own, to validate uploads
        self._lock = threading.RLock()
        self._keys: dict[str, bytes] = {}      # every registered key set, to hand a respawned worker
        self._files: list[str] = []            # key files and aborted passes' folders, removed once drained
        self.respawns = self.passes = self.failures = 0
        self.encode_seconds = 0.0
        self._tmp = tempfile.mkdtemp(prefix="privrad-he-run-", dir=SCRATCH_DIR)
        self._mp = mp.get_context("forkserver")
        self._mp.set_forkserver_preload([__name__])   # imported once in the fork server, not per worker
        self._pool: list[_Worker] = []
        try:
            if keys is not None:
                self._keys[""] = keys.blob
            self._pool = [self._spawn(k) for k in range(workers)]
            self._settle(time.monotonic() + self.start_timeout)
            self._raise_broken()
        except BaseException:
            self.close()
            raise
        if progress is not None:
            progress(f"{workers} workers ready: plaintexts encoded in {self.encode_seconds:.1f} s")

    # -- worker lifecycle --------------------------------------------------------------------
    def _spawn(self, k: int) -> _Worker:
        """Start worker ``k``; it owes READY, then OK for every registered key set (sent now, read after start)."""
        parent, child = self._mp.Pipe()
        column = tuple(row[k] for row in self.tasks)
        proc = self._mp.Process(target=_worker, args=(child, self.model_path, self.model.digest, column), daemon=True,
                                name=f"privrad-he-worker-{k}")
        proc.start()
        child.close()  # so that a dead worker reads as EOF here
        w = _Worker(k, proc, parent, deque([WorkerMessage.READY]))
        for kid, blob in self._keys.items():
            path = os.path.join(self._tmp, f"keys-{k}-{time.monotonic_ns()}")
            Path(path).write_bytes(blob)   # in RAM, rather than pickled down the pipe
            self._files.append(path)
            w.send(WorkerMessage.KEYS, kid, path)
            w.owed.append(WorkerMessage.OK)
        return w

    def _lost(self, w: _Worker) -> None:
        """``w``'s process ended: reap it; a worker that had started is replaced, one that had not is broken."""
        w.proc.join(timeout=1.0)
        w.gone = True
        code = w.proc.exitcode
        with contextlib.suppress(EOFError, OSError):
            while w.conn.poll():   # what it said before it went (a start error names the cause)
                self._on_message(w, w.conn.recv())
        with contextlib.suppress(OSError):
            w.conn.close()
        if not w.ready:
            w.broken = w.broken or f"HE worker {w.index} exited with code {code} while starting"
            log.error("%s", w.broken)
            return
        log.warning("HE worker %d died (exit code %s); respawning it", w.index, code)
        self._pool[w.index] = self._spawn(w.index)
        self.respawns += 1

    def _on_message(self, w: _Worker, msg: tuple[Any, ...]) -> tuple[str, str] | None:
        """Account for one reply ``w`` owed; an ERROR is returned as (class name, line) for the caller."""
        expected = w.owed.popleft() if w.owed else None
        kind = msg[0]
        if kind == WorkerMessage.ERROR:
            _, layer, name, line, tb = msg
            log.warning("HE worker %d failed (%s, layer %s): %s", w.index, expected, layer, tb)
            if expected == WorkerMessage.READY:
                w.broken = f"HE worker {w.index} failed to start: {name}: {line}"
            return name, line
        if kind != expected:
            log.error("HE worker %d answered %s, expected %s: killing it", w.index, kind, expected)
            w.proc.kill()
            return None
        if kind == WorkerMessage.READY:
            w.ready = True
            self.encode_seconds = max(self.encode_seconds, float(msg[1]))
        return None

    def _settle(self, deadline: float | None) -> list[tuple[_Worker, str, str]]:
        """Respawn dead workers and collect every owed reply (until ``deadline``; ``None``: only what is there now).

        Returns the errors workers answered while settling. A worker still owing at the
        deadline is killed (and, if it had started, replaced).
        """
        errs: list[tuple[_Worker, str, str]] = []
        while True:
            for w in list(self._pool):
                if not w.gone and not w.proc.is_alive():
                    self._lost(w)
            waiting = [w for w in self._pool if w.owed and not w.gone]
            if not waiting:
                break
            left = 0.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                for w in waiting:   # hung: killed; one that had started is replaced (the next call waits for it)
                    w.broken = w.broken or (f"HE worker {w.index} did not answer within {self.start_timeout:g} s "
                                            f"(waiting for {w.owed[0]})")
                    w.proc.kill()
                    w.proc.join(timeout=STOP_GRACE_S)
                    self._lost(w)
                break
            handles: dict[Any, _Worker] = {}
            for w in waiting:
                handles[w.conn] = w
                handles[w.proc.sentinel] = w
            ready = wait(list(handles), timeout=left)
            if not ready and deadline is None:
                return errs   # nothing more to collect now
            for h in ready:
                w = handles[h]
                if w.gone or h is w.proc.sentinel:
                    continue   # reaped at the top of the loop
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join(timeout=1.0)
                    continue
                err = self._on_message(w, msg)
                if err is not None:
                    errs.append((w, *err))
        if not any(w.owed for w in self._pool):
            for path in self._files:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    Path(path).unlink(missing_ok=True)
            self._files.clear()
        return errs

    def _raise_broken(self) -> None:
        """An HEError naming every worker that cannot serve, if one cannot."""
        broken = [w.broken for w in self._pool if w.broken]
        if broken:
            raise HEError("; ".join(broken))
        late = [w.index for w in self._pool if w.owed or not w.ready]
        if late:
            raise HEError(f"HE workers {late} are restarting; retry the request")

    # -- key sets ----------------------------------------------------------------------------
    def add_keys(self, key_id: str, keys: PublicKeys) -> None:
        """Load another client's evaluation keys into every worker, under ``key_id``."""
        keys = require_keys_for(keys, self.model.params, self.model.plan.steps)
        with self._lock:
            self._settle(time.monotonic() + self.start_timeout)
            self._raise_broken()
            path = os.path.join(self._tmp, f"keys-{time.monotonic_ns()}")
            Path(path).write_bytes(keys.blob)   # once, in RAM, rather than pickled down every pipe
            self._files.append(path)
            for w in self._pool:
                w.send(WorkerMessage.KEYS, key_id, path)
                w.owed.append(WorkerMessage.OK)
            self._keys[key_id] = keys.blob
            errs = self._settle(time.monotonic() + self.start_timeout)
            if errs or any(w.broken for w in self._pool):
                self.forget_keys(key_id)
                self._raise_broken()
                _, name, line = errs[0]
                raise _error_class(name)(f"HE worker {errs[0][0].index} could not load the keys: {line}")

    def forget_keys(self, key_id: str) -> None:
        """Release a client's evaluation keys in every worker."""
        with self._lock:
            self._keys.pop(key_id, None)
            for w in self._pool:
                if not w.gone:
                    w.send(WorkerMessage.FORGET, key_id)

    # -- a pass ------------------------------------------------------------------------------
    def infer(self, upload: bytes, *, key_id: str = "", progress: Callable[[str, int, int], None] | None = None
              ) -> tuple[bytes, list[LayerTiming]]:
        """One encrypted classification: ``encrypted-image`` container in, ``encrypted-logits`` out.

        ``key_id`` selects keys given to :meth:`add_keys` (default: the keys the pool started with).

        Raises
        ------
        CiphertextError
            The upload is refused before any worker sees it (names what is wrong).
        KeyMaterialError
            No keys under ``key_id``.
        WorkerLostError
            A worker died during this pass; it is being respawned, the next request waits for it.
        HEError
            A worker failed during the pass (its one-line message; the pool is reset), or the pool
            lost a worker that could not be restarted.
        """
        model = self.model
        load_upload(upload, model.params, self._context, model_sha256=model.digest, n_inputs=model.plan.n_inputs)
        with self._lock:
            if key_id not in self._keys:
                raise KeyMaterialError(f"no evaluation keys registered under {key_id[:32]!r}")
            self._settle(time.monotonic() + self.start_timeout)
            self._raise_broken()
            workdir = tempfile.mkdtemp(dir=self._tmp)
            try:
                reply = self._run(upload, workdir, key_id, progress)
            except BaseException:
                self.failures += 1
                self._files.append(workdir)   # removed once the aborted pass's replies are drained
                raise
            shutil.rmtree(workdir, ignore_errors=True)
            self.passes += 1
            return reply

    def _run(self, upload: bytes, workdir: str, key_id: str, progress: Callable[[str, int, int], None] | None
             ) -> tuple[bytes, list[LayerTiming]]:
        model = self.model
        input_path = os.path.join(workdir, "input")
        Path(input_path).write_bytes(upload)
        pool = list(self._pool)
        for w in pool:
            w.send(WorkerMessage.RUN, workdir, input_path, key_id)
        timings = []
        for li, (name, _, _) in enumerate(model.plan.layers):
            t0 = time.perf_counter()
            for w in pool:
                w.send(WorkerMessage.GO, li)
                w.owed.append(WorkerMessage.DONE)
            counts = self._barrier(pool, li)
            timings.append(LayerTiming(name, time.perf_counter() - t0, counts))
            if progress is not None:
                progress(name, li + 1, len(model.plan.layers))
        out = [(f"ct{n}", Path(workdir, f"r{r}").read_bytes()) for n, r in enumerate(model.plan.outputs)]
        return pack(ContainerKind.ENCRYPTED_LOGITS, out, params_sha256=model.params.digest(), model_sha256=model.digest,
                    classes=list(model.classes)), timings

    def _barrier(self, pool: list[_Worker], li: int) -> dict[Kind, int]:
        """Every worker's DONE for layer ``li``; on the first ERROR or death, ABORT the pass everywhere and raise."""
        counts = Counter[Kind]()
        pending: dict[Any, _Worker] = {w.conn: w for w in pool} | {w.proc.sentinel: w for w in pool}
        while any(w.owed for w in pool):
            for h in wait(list(pending), timeout=None):
                w = pending[h]
                if h is w.proc.sentinel:
                    return self._abort(pool, WorkerLostError(
                        f"HE worker {w.index} died during layer {li} (exit code {w.proc.exitcode}); it is being "
                        "respawned: retry the request"), dead=w)
                if not w.owed:
                    continue
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    continue   # its sentinel fires next
                err = self._on_message(w, msg)
                if err is not None:
                    name, line = err
                    return self._abort(pool, _error_class(name)(f"HE worker {w.index} failed at layer {li}: {line}"))
                if msg[0] == WorkerMessage.DONE:
                    counts.update(msg[3])
                    del pending[w.conn], pending[w.proc.sentinel]
        return dict(counts)

    def _abort(self, pool: list[_Worker], exc: HEError, *, dead: _Worker | None = None) -> dict[Kind, int]:
        """Tell every live worker of this pass to drop it (their owed replies are drained later), then raise ``exc``."""
        for w in pool:
            if w is not dead:
                w.send(WorkerMessage.ABORT)
        if dead is not None:
            self._lost(dead)
        raise exc

    # -- state -------------------------------------------------------------------------------
    @property
    def pids(self) -> tuple[int | None, ...]:
        """The worker processes' ids, by worker index (a replaced worker's new id)."""
        return tuple(w.proc.pid for w in self._pool)

    @property
    def scratch(self) -> Path:
        """The pool's scratch folder (in RAM where the platform has one): uploads, transfers, key files."""
        return Path(self._tmp)

    def health(self) -> PoolHealth:
        """Workers alive, respawns, the state and the pass counters (collects finished restarts without waiting)."""
        if self._lock.acquire(blocking=False):
            try:
                self._settle(None)   # reaps the dead and collects finished restarts
            finally:
                self._lock.release()
        # during a pass, the coordinator's own view: only its thread may poll the processes
        pool = list(self._pool)
        alive = sum(not w.gone for w in pool)
        if any(w.broken for w in pool) or alive < self.workers:
            state = PoolState.DEGRADED
        elif all(w.ready and not w.owed for w in pool):
            state = PoolState.OK
        else:
            state = PoolState.RESTARTING
        return PoolHealth(self.workers, alive, self.respawns, state, self.passes, self.failures)

    def close(self) -> None:
        """Stop the workers and remove the scratch directory."""
        for w in self._pool:
            w.send(WorkerMessage.STOP)
        for w in self._pool:
            w.proc.join(timeout=STOP_GRACE_S)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=STOP_GRACE_S)
            with contextlib.suppress(OSError):
                w.conn.close()
        self._pool = []
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ParallelEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
