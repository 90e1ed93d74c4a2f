"""``privrad he load``: concurrent hospitals' clients against a real ``he serve`` process.

:func:`load_test` runs ``clients`` threads against a running service, client ``c`` belonging
to hospital ``c mod H`` (its token and its key folder: several workstations of one hospital
share its keys, as the service holds at most ``keys_per_hospital`` key sets per hospital),
each classifying ``requests`` images; it records every latency and samples the server's
resident memory (the service process and its worker processes together). :func:`run_load`
is the whole harness behind the command: compile a model, issue the tokens, start the
service, run the load, check every decrypted answer against PyTorch, stop the service.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from federation.errors import ConfigError
from federation.model import build_model
from federation.storage import atomic_write_json, load_checkpoint, save_checkpoint
from he_inference.bench import ARCHS
from he_inference.client import ServiceClient
from he_inference.compiler import compile_checkpoint
from he_inference.passes.ir import Array
from he_inference.tokens import TokenStore
from simulations.children import stop_child
from simulations.he_demo import start_service

__all__ = ["LoadReport", "LoadResult", "RssSampler", "load_test", "run_load"]

log = logging.getLogger(__name__)

CLASSES = ("normal", "cyst", "tumour")


class RssSampler:
    """The peak resident memory of a process and its children, sampled in a thread (a context manager)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.proc, self.every_s = psutil.Process(pid), every_s
        self.peak = self.first = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Bytes resident now, the process and all its descendants."""
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):   # a child that just left
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass(frozen=True)
class LoadResult:
    """Every request of a load test (in client-major order) and the server's memory."""

    image_index: tuple[int, ...]          # which of the images request k classified
    logits: Array                         # (requests, classes), decrypted
    latency_s: tuple[float, ...]          # encrypt + post (+ waits and retries) + decrypt
    server_s: tuple[float, ...]           # the service's X-Privrad-Seconds
    upload_bytes: int                     # the largest upload sent
    wall_s: float
    registrations: int                    # POST /keys the clients made (re-registrations included)
    rss_start_bytes: int | None           # the server before these hospitals' keys
    rss_keys_bytes: int | None            # ... once each hospital's key set is registered
    rss_peak_bytes: int | None            # the peak over the whole test

    def percentile(self, q: float) -> float:
        """A latency percentile, seconds."""
        return float(np.percentile(self.latency_s, q))


def load_test(url: str, *, hospitals: Mapping[str, tuple[str, Path]], images: Array, clients: int, requests: int,
              server_pid: int | None = None, ca_cert: Path | None = None) -> LoadResult:
    """``clients`` concurrent clients (hospital ``c mod H``), ``requests`` classifications each.

    ``hospitals`` maps a name to its (token, key folder); missing keys are made first, one
    hospital at a time, so that concurrent clients of one hospital load the same keys.
    """
    names = sorted(hospitals)
    if not names or clients < 1 or requests < 1:
        raise ConfigError(f"`hospitals`, `clients` and `requests` must be non-empty / ≥ 1, got {len(names)}, "
                          f"{clients}, {requests}")
    def one_client(c: int) -> list[tuple[int, Array, float, float, int]]:
        name = names[c % len(names)]
        token, keys = hospitals[name]
        out = []
        with ServiceClient(url, keys, token=token, ca_cert=ca_cert, keys=loaded[name]) as client:
            for r in range(requests):
                k = (c * requests + r) % len(images)
                t0 = time.perf_counter()
                got = client.classify(images[k])
                logits = np.array(list(got.prediction.logits.values()))   # in the model's class order
                out.append((k, logits, time.perf_counter() - t0, got.server_s, got.upload_bytes))
            regs.append(client.registrations)
        return out

    regs: list[int] = []
    sampler = RssSampler(server_pid) if server_pid is not None else None
    with sampler if sampler is not None else contextlib.nullcontext():
        loaded = {}   # one SecretKeys per hospital, shared by its clients (each holds the public keys too)
        for name in names:   # first contact: keys generated and registered once per hospital
            token, keys = hospitals[name]
            with ServiceClient(url, keys, token=token, ca_cert=ca_cert) as first:
                loaded[name] = first.keys
        rss_keys = sampler.rss() if sampler is not None else None
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            rows = [row for rows in pool.map(one_client, range(clients)) for row in rows]
        wall = time.perf_counter() - t0
    return LoadResult(tuple(r[0] for r in rows), np.array([r[1] for r in rows]), tuple(r[2] for r in rows),
                      tuple(r[3] for r in rows), max(r[4] for r in rows), wall, sum(regs) + len(names),
                      sampler.first if sampler else None, rss_keys, sampler.peak if sampler else None)


@dataclass(frozen=True)
class LoadReport:
    """The figures of one ``he load`` run."""

    size: int
    clients: int
    hospitals: int
    requests: int
    workers: int
    classifications: int
    p50_s: float
    p95_s: float
    max_s: float
    server_s_median: float
    wall_s: float
    rss_start_mb: float
    rss_per_key_set_mb: float
    rss_peak_mb: float
    max_abs_logit_err: float
    max_abs_logit: float
    argmax_agreement: float
    key_bytes: int
    upload_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``load.json``)."""
        return asdict(self)


def run_load(out: Path, *, size: int = 64, checkpoint: Path | None = None, clients: int = 16, hospitals: int = 4,
             requests: int = 5, workers: int = 2, say: Callable[[str], None] = log.info) -> LoadReport:
    """Compile, issue tokens, serve on loopback, load it, check every answer against PyTorch; writes ``load.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        if size not in ARCHS:
            raise ConfigError(f"`size` must be one of {sorted(ARCHS)} for the built-in model, got {size}")
        checkpoint = out / "model.pt"
        save_checkpoint(checkpoint, build_model(ARCHS[size], seed=0).eval(),
                        meta={"classes": list(CLASSES), "preprocess": {"size": size}})
    model = load_checkpoint(checkpoint).model.eval()
    compiled = compile_checkpoint(checkpoint).compiled
    he = out / "model.he"
    compiled.save(he)
    tokens = out / "tokens.json"
    tokens.unlink(missing_ok=True)
    names = [f"hospital-{k + 1}" for k in range(hospitals)]
    issued = {n: (TokenStore.add(tokens, n), out / "keys" / n) for n in names}
    say(f"compiled {checkpoint} → {he} (N={compiled.params.poly_degree}, depth {compiled.depth}); starting the "
        f"service with {hospitals} hospitals' tokens …")
    proc, url = start_service(he, tokens=tokens, workers=workers,
                              extra=["--max-clients", str(hospitals), "--max-queue", str(clients)])
    try:
        images = np.random.default_rng(0).uniform(0, 1, (clients * requests, *compiled.image_shape))
        say(f"{clients} clients × {requests} classifications …")
        result = load_test(url, hospitals=issued, images=images, clients=clients, requests=requests,
                           server_pid=proc.pid)
    finally:
        stop_child(proc, grace_s=60)
    with torch.no_grad():
        ref = model(torch.as_tensor(images, dtype=torch.float32)).double().numpy()[list(result.image_index)]
    report = LoadReport(
        size=compiled.image_shape[-1], clients=clients, hospitals=hospitals, requests=requests, workers=workers,
        classifications=len(result.latency_s), p50_s=result.percentile(50), p95_s=result.percentile(95),
        max_s=max(result.latency_s), server_s_median=float(np.median(result.server_s)), wall_s=result.wall_s,
        rss_start_mb=(result.rss_start_bytes or 0) / 2**20,
        rss_per_key_set_mb=((result.rss_keys_bytes or 0) - (result.rss_start_bytes or 0)) / hospitals / 2**20,
        rss_peak_mb=(result.rss_peak_bytes or 0) / 2**20,
        max_abs_logit_err=float(np.abs(result.logits - ref).max()), max_abs_logit=float(np.abs(ref).max()),
        argmax_agreement=float(np.mean(result.logits.argmax(1) == ref.argmax(1))),
        key_bytes=(out / "keys" / names[0] / "public.keys").stat().st_size,
        upload_bytes=result.upload_bytes)
    atomic_write_json(out / "load.json", report.to_dict())
    return report
