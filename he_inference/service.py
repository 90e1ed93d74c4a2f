"""The encrypted-inference web service (FastAPI): it only ever sees public keys and ciphertext.

Endpoints (all JSON except the binary bodies, which are ``application/octet-stream``):

* ``GET /health``: liveness and the worker pool's state (``pool``); 503 when no worker is alive.
* ``GET /model``: what a client needs to check before it encrypts: CKKS parameters and their
  hash, the compiled model's sha256, classes, input shape, the number of input ciphertexts,
  the rotation steps the evaluation keys must cover, and the size limits.
* ``POST /keys``: a client's ``public.keys`` container; answers ``{"key_id": ...}``. A secret
  key file, keys for other parameters or without this model's rotations are refused.
* ``POST /infer/{key_id}``: an ``encrypted-image`` container; answers the
  ``encrypted-logits`` container, with the server-side seconds in ``X-Privrad-Seconds``.

Every refusal is a 4xx JSON body ``{"error": ..., "detail": ...}`` naming what is wrong; the
service keeps serving. The model's plaintexts are encoded once, at start, and shared by all
clients; each registered client adds only its evaluation keys (the least recently used leave
beyond ``max_clients``). Encrypted passes run one at a time on the worker pool (each already
uses every core); concurrent requests queue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from federation.errors import CiphertextError, HEError, KeyMaterialError
from he_inference.artifact import CompiledModel
from he_inference.keys import PublicKeys, key_id
from he_inference.parallel import PoolState
from he_inference.server import InferenceServer

__all__ = ["ServiceLimits", "create_app", "serve"]

OCTET = "application/octet-stream"


@dataclass(frozen=True)
class ServiceLimits:
    """Request size limits and how many clients' key sets stay loaded (least recently used leave)."""

    max_upload_bytes: int = 64 * 2**20
    max_key_bytes: int = 1024 * 2**20
    max_clients: int = 4

    def __post_init__(self) -> None:
        if min(self.max_upload_bytes, self.max_key_bytes, self.max_clients) < 1:
            raise ValueError(f"`max_upload_bytes`, `max_key_bytes` and `max_clients` must be ≥ 1, got "
                             f"{self.max_upload_bytes}, {self.max_key_bytes}, {self.max_clients}")


class RefusalError(Exception):
    """A request the service refuses: the HTTP status, a short error name and the detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


async def _body(request: Request, limit: int, what: str) -> bytes:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip() != OCTET:
        raise RefusalError(415, "unsupported_media_type", f"{what} must be sent as {OCTET}, got {ctype or 'none'}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RefusalError(413, "payload_too_large", f"{what} is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RefusalError(413, "payload_too_large", f"{what} exceeds the limit of {limit} bytes")
    data = b"".join(chunks)
    if not data:
        raise RefusalError(400, "empty_body", f"{what} is empty")
    return data


def create_app(model_path: Path, *, workers: int = 2, limits: ServiceLimits | None = None) -> FastAPI:
    """The service for one compiled model (its plaintexts are encoded once, per key set's pool)."""
    limits = limits or ServiceLimits()
    model = CompiledModel.load(Path(model_path))
    server = InferenceServer(model, workers=workers, model_path=Path(model_path))
    recent: OrderedDict[str, None] = OrderedDict()   # registered key ids, least recently used first
    lock = threading.Lock()   # one encrypted pass at a time: each already uses every worker
    app = FastAPI(title="privrad encrypted inference", version="1")
    info: dict[str, Any] = {
        **model.client().to_dict(), "input_ciphertexts": model.plan.n_inputs, "depth": model.depth,
        "workers": workers,
        "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_key_bytes": limits.max_key_bytes,
                   "max_clients": limits.max_clients},
    }

    @app.exception_handler(RefusalError)
    async def refused(_: Request, exc: RefusalError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)

    @app.get("/health")
    def health() -> JSONResponse:
        pool = server.health()   # never waits for a running pass
        body = {"status": "ok" if pool.state is PoolState.OK else "degraded", "model_sha256": model.digest,
                "clients_loaded": len(recent), "pool": pool.to_dict()}
        return JSONResponse(body, status_code=200 if pool.alive else 503)

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        return info

    @app.post("/keys")
    async def register(request: Request) -> dict[str, Any]:
        blob = await _body(request, limits.max_key_bytes, "the evaluation keys")
        known_id = key_id(blob)
        if known_id in recent:   # the same keys again: nothing to load
            recent.move_to_end(known_id)
            return {"key_id": known_id, "new": False}
        try:
            keys = PublicKeys.from_bytes(blob, model.params, source="the uploaded keys")
        except KeyMaterialError as exc:
            raise RefusalError(422, "bad_keys", str(exc)) from exc
        except CiphertextError as exc:
            raise RefusalError(400, "malformed_keys", str(exc)) from exc

        def add() -> tuple[str, bool]:
            with lock:
                new = known_id not in recent
                kid = server.register(keys)
                recent[kid] = None
                recent.move_to_end(kid)
                while len(recent) > limits.max_clients:
                    old, _ = recent.popitem(last=False)
                    server.forget(old)
                return kid, new

        try:
            kid, new = await anyio.to_thread.run_sync(add)
        except KeyMaterialError as exc:
            raise RefusalError(422, "bad_keys", str(exc)) from exc
        return {"key_id": kid, "new": new}

    @app.post("/infer/{key_id}")
    async def infer(key_id: str, request: Request) -> Response:
        upload = await _body(request, limits.max_upload_bytes, "the encrypted image")

        def run() -> tuple[bytes, float]:
            with lock:
                if key_id not in recent:
                    raise RefusalError(404, "unknown_key_id", f"no evaluation keys registered under {key_id[:32]!r}: "
                                                              "POST /keys first (keys may have been evicted)")
                recent.move_to_end(key_id)
                t0 = time.perf_counter()
                reply, _ = server.infer(upload, key_id=key_id)
                return reply, time.perf_counter() - t0

        try:
            reply, seconds = await anyio.to_thread.run_sync(run)
        except CiphertextError as exc:
            raise RefusalError(400, "bad_ciphertext", str(exc)) from exc
        except HEError as exc:
            raise RefusalError(422, "cannot_evaluate", str(exc)) from exc
        return Response(reply, media_type=OCTET, headers={"X-Privrad-Seconds": f"{seconds:.3f}"})

    app.state.inference = server   # closed by the caller (serve() does it on shutdown)
    return app


def serve(model_path: Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          tls_cert: Path | None = None, tls_key: Path | None = None, limits: ServiceLimits | None = None) -> None:
    """Run the service with uvicorn until interrupted; the worker pool is stopped on the way out."""
    if (tls_cert is None) != (tls_key is None):
        raise HEError("TLS needs both --tls-cert and --tls-key")
    app = create_app(model_path, workers=workers, limits=limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)
    finally:
        app.state.inference.close()
