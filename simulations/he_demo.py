"""The end of ``make demo``: the federated model classifies one encrypted slice through the service.

:func:`start_service` runs ``privrad he serve`` as a child process on loopback (the demo and
the service tests use it).

Compile the global model, issue a token for the demo hospital (``OUT/tokens.json`` keeps its
hash, ``OUT/demo-hospital.token`` the token), start the encrypted-inference service on
loopback, let the hospital's client (its token, its own keys) encrypt one held-out slice,
have the service classify it on ciphertext, decrypt, and report the result beside the
privacy spent in training and the timings.
"""

from __future__ import annotations

import csv
import json
import logging
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from federation.errors import DataError, HEError
from federation.net import free_port
from federation.storage import atomic_write_bytes, atomic_write_json, load_checkpoint
from he_inference.client import ServiceClient
from he_inference.compiler import compile_checkpoint, load_calibration
from he_inference.tokens import TokenStore
from simulations.children import stop_child

__all__ = ["DemoSummary", "run_demo", "start_service"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32   # public images the demo calibrates on
DEMO_HOSPITAL = "demo-hospital"   # the one hospital of the demo: its token lands in OUT/demo-hospital.token


def start_service(model_path: Path, *, tokens: Path | None = None, port: int | None = None, workers: int = 2,
                  extra: list[str] | None = None, tls: tuple[Path, Path, Path] | None = None,
                  timeout: float = 300.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``privrad he serve`` as a child process on loopback; returns (process, URL) once healthy.

    ``tokens`` is the hospitals' tokens file (default: ``tokens.json`` beside the model, made
    empty if missing: only ``/health`` answers then). ``tls`` = (certificate, key, CA
    certificate) serves HTTPS, checked against that CA.
    """
    port = port or free_port()
    if tokens is None:
        tokens = Path(model_path).parent / "tokens.json"
        if not tokens.is_file():
            TokenStore().save(tokens)
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli.main", "he", "serve", "--model", str(model_path),
                             "--tokens", str(tokens), "--port", str(port), "--workers", str(workers), *(extra or []),
                             *(["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=str(tls[2])) if tls else True
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2, verify=verify).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise HEError(f"the encrypted-inference service did not start:\n{output[-2000:]}")
        time.sleep(0.5)


@dataclass(frozen=True)
class DemoSummary:
    """What the demo shows: one encrypted classification beside the training's privacy and the timings."""

    slice: str
    true_label: str
    he_prediction: str
    probabilities: dict[str, float]
    federated_macro_auc: float | None
    epsilon_spent_max: float | None
    delta: float | None
    service_url: str
    service_start_s: float
    client_keygen_and_register_s: float
    encrypted_round_trip_s: float
    server_s: float
    upload_bytes: int
    download_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``demo.json``)."""
        return asdict(self)


def run_demo(run: Path, data: Path, out: Path, *, workers: int = 2,
             say: Callable[[str], None] = log.info) -> DemoSummary:
    """Compile, serve, classify one test slice; writes ``out/demo.json``; the service is stopped on the way out."""
    model_pt = run / "global_model.pt"
    ckpt = load_checkpoint(model_pt)
    calib = None
    if (data / "public").is_dir():  # public images only: model.he (and its value ranges) goes to the server
        calib = load_calibration(data / "public", meta=ckpt.meta, n=CALIBRATION_IMAGES)
    t0 = time.perf_counter()
    compiled = compile_checkpoint(model_pt, checkpoint=ckpt, calibration=calib).compiled
    he = out / "model.he"
    compiled.save(he)
    compile_s = time.perf_counter() - t0
    say(f"compiled {model_pt} → {he}: N={compiled.params.poly_degree}, depth {compiled.depth} "
        f"({compile_s:.1f} s); starting the service …")
    labels = {row["file"]: row["label"] for row in csv.DictReader((data / "test" / "labels.csv").open())}
    if not labels:
        raise DataError(data / "test" / "labels.csv", "lists no slices")
    slice_name = sorted(labels)[0]
    tokens = out / "tokens.json"
    if tokens.is_file():
        tokens.unlink()   # a fresh demo: one token, for the demo hospital
    token = TokenStore.add(tokens, DEMO_HOSPITAL)
    atomic_write_bytes(out / f"{DEMO_HOSPITAL}.token", (token + "\n").encode())   # owner-only (mkstemp)
    t0 = time.perf_counter()
    proc, url = start_service(he, tokens=tokens, workers=workers)
    start_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        with ServiceClient(url, out / "keys", token=token) as client:
            keys_s = time.perf_counter() - t0
            result = client.classify_files([data / "test" / slice_name])[0]
    finally:
        stop_child(proc, grace_s=60)
    metrics: dict[str, Any] = {}
    if (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
    sites: dict[str, dict[str, Any]] = metrics.get("sites", {})
    eps = {site: v.get("epsilon") for site, v in sites.items()}
    summary = DemoSummary(
        slice=slice_name, true_label=labels[slice_name], he_prediction=result.prediction.label,
        probabilities=result.prediction.probabilities,
        federated_macro_auc=metrics.get("final", {}).get("auc_macro"),
        epsilon_spent_max=max((e for e in eps.values() if e is not None), default=None),
        delta=next(iter(sites.values()), {}).get("delta"),
        service_url=url, service_start_s=start_s, client_keygen_and_register_s=keys_s,
        encrypted_round_trip_s=result.round_trip_s, server_s=result.server_s,
        upload_bytes=result.upload_bytes, download_bytes=result.download_bytes)
    atomic_write_json(out / "demo.json", summary.to_dict())
    return summary
