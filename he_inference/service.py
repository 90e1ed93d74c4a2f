"""The encrypted-inference web service (FastAPI): it only ever sees public keys and ciphertext.

Endpoints (JSON, except the binary bodies, which are ``application/octet-stream``):

* ``GET /health``: liveness and the worker pool's state (``pool``), 503 when no worker is
  alive; the only endpoint open without a token.
* ``GET /model``: what a client checks before it encrypts: CKKS parameters and their hash,
  the compiled model's sha256, classes, input shape and preprocessing, the number of input
  ciphertexts, the rotation steps the evaluation keys must cover, and the limits.
* ``POST /keys``: the hospital's ``public.keys`` container; answers ``{"key_id": ...}``. A
  secret key file, keys for other parameters or without this model's rotations are refused.
* ``POST /infer/{key_id}``: an ``encrypted-image`` container; answers the ``encrypted-logits``
  container, with the server-side seconds in ``X-Privrad-Seconds``.
* ``GET /openapi.json``: the contract (bearer token required too).

Authentication: every endpoint but ``/health`` needs ``Authorization: Bearer TOKEN``, a token
the operator issued to the hospital (:mod:`he_inference.tokens`); none is a 401 with
``WWW-Authenticate``, a wrong or revoked one a 403. A hospital's key sets are its own: another
hospital's key id is a 404, as an unknown one is; a hospital holds at most
``keys_per_hospital`` key sets (registering more replaces its own least recently used), and
when all ``max_clients`` are taken only another hospital's key set idle for ``key_idle_s`` may
leave, otherwise the registration is a 503 with ``Retry-After``. With a key store
(:mod:`~he_inference.keystore`, ``he serve``'s default) admitted key sets are kept on disk
and reloaded at start, so a key id stays valid across restarts and a hospital uploads its
keys once; released ones are deleted.

Limits, all checked before a body is read: the token, the key id, the media type and the
declared size (``Content-Length``) against :func:`wire_bounds`, the largest key set and
upload the model's parameters allow (a body sent without a length is cut at the bound while
it streams); then a slot: at most ``max_queue`` inference requests admitted (running or
waiting for the worker pool) and ``max_key_uploads`` key sets being read and parsed, beyond
that a 503 with ``Retry-After``. Key parsing and registration run off the event loop.

Every refusal is a JSON body ``{"error": ..., "detail": ...}`` naming what is wrong; the
service keeps serving. Failures of the worker pool are a 503 with a generic detail and an
unexpected exception a 500 with a generic body: tracebacks and server paths stay in the log.
"""


import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import psutil
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from federation.errors import CiphertextError, ConfigError, HEError, KeyMaterialError
from he_inference.artifact import CompiledModel, MetaKey
from he_inference.ckks import CKKSParams
from he_inference.keys import PublicKeys, galois_elements, key_id, require_keys_for
from he_inference.keystore import KeyStore, hospital_key_id
from he_inference.parallel import PoolState
from he_inference.server import InferenceServer
from he_inference.tokens import TokenFile

__all__ = ["ErrorBody", "KeyRegistry", "ServiceLimits", "WireBounds", "create_app", "key_memory_bound", "serve",
           "wire_bounds"]

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"
KEY_ID_PATTERN = "^[0-9a-f]{32}$"
LOOPBACK_NAMES = ("localhost",)
PUBLIC_META = (MetaKey.PREPROCESS, MetaKey.CALIBRATION, MetaKey.SOURCE_SHA256)   # never the checkpoint's path
BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="privrad-he"'}
T = TypeVar("T")

# -- sizes ---------------------------------------------------------------------------------------
# SEAL writes each polynomial coefficient modulo a b-bit prime as a 64-bit word and compresses
# the object with zstd. The residues are uniform, so a word compresses to about b/8 bytes plus
# the cost of its zero high bytes; measured at N = 16384 (bytes per coefficient): 30 bits 4.47,
# 35 bits 5.32, 40 bits 6.03, 45 bits 6.73, 50 bits 7.19, 55 bits 7.54, 60 bits 8.00 (stored
# raw). ``b/8 + 1.25``, capped at 8, bounds every one of them (2-4 % above for 40-bit primes).
COEFF_SLACK_BYTES = 1.25
OBJECT_OVERHEAD_BYTES = 4096     # SEAL's header, the seed of a seeded polynomial, zstd's frame
CONTAINER_HEADER_BYTES = 4096    # the container's first line and JSON header, besides its part list
PART_HEADER_BYTES = 64           # one [name, nbytes] entry of the part list
ELEMENT_HEADER_BYTES = 8         # one Galois element in the public-keys header


def _seeded_poly_bytes(poly_degree: int, bits: tuple[int, ...]) -> int:
    """The largest compressed size of one seeded SEAL object: one polynomial over the moduli ``bits``."""
    per_coeff = sum(min(8.0, b / 8 + COEFF_SLACK_BYTES) for b in bits)
    return math.ceil(poly_degree * per_coeff) + OBJECT_OVERHEAD_BYTES


@dataclass(frozen=True)
class WireBounds:
    """The largest ``public-keys`` and ``encrypted-image`` containers a model's parameters allow (bytes)."""

    key_bytes: int
    upload_bytes: int


def wire_bounds(params: CKKSParams, *, n_galois: int, n_inputs: int) -> WireBounds:
    """The size bounds of a key set and an upload, from the parameters (see the constants above).

    A key set is the relinearisation key and ``n_galois`` Galois keys; each key is ``L``
    seeded ciphertexts (one per data prime) over all ``L + 1`` primes, the special one
    included. An upload is ``n_inputs`` seeded ciphertexts at the top level (the ``L`` data
    primes).
    """
    data, every = params.coeff_bits[:-1], params.coeff_bits
    n = params.poly_degree
    keys = ((n_galois + 1) * len(data) * _seeded_poly_bytes(n, every) + CONTAINER_HEADER_BYTES
            + 2 * PART_HEADER_BYTES + n_galois * ELEMENT_HEADER_BYTES)
    upload = n_inputs * (_seeded_poly_bytes(n, data) + PART_HEADER_BYTES) + CONTAINER_HEADER_BYTES
    return WireBounds(keys, upload)


def loaded_key_bytes(params: CKKSParams, *, n_galois: int) -> int:
    """Memory of one key set once SEAL has loaded it: both polynomials of every component, 8 bytes a word."""
    levels = len(params.coeff_bits)
    return (n_galois + 1) * (levels - 1) * 2 * levels * params.poly_degree * 8


def key_memory_bound(params: CKKSParams, *, n_galois: int, workers: int, max_clients: int,
                     max_key_uploads: int = 1) -> int:
    """Memory the service's key sets may take at most (bytes), beside the encoded model.

    Each of ``max_clients`` key sets is loaded once per pass-running process (every worker; the
    service process itself when ``workers`` is 1) and, with a pool, kept serialised by the
    coordinator to reload a respawned worker; each upload being registered holds its body and
    one parsed copy in the service process.
    """
    loaded = loaded_key_bytes(params, n_galois=n_galois)
    blob = wire_bounds(params, n_galois=n_galois, n_inputs=1).key_bytes
    per_set = workers * loaded + blob if workers > 1 else loaded
    return max_clients * per_set + max_key_uploads * (loaded + blob)


# -- limits and the key registry ----------------------------------------------------------------
@dataclass(frozen=True)
class ServiceLimits:
    """How many key sets stay loaded, per hospital and in all, and how many requests are admitted at once."""

    max_clients: int = 4          # key sets loaded in all
    keys_per_hospital: int = 1    # key sets one hospital holds (more replace its own least recently used)
    key_idle_s: float = 900.0     # a full service lets another hospital's key set go after this long unused
    max_queue: int = 16           # inference requests admitted: running or waiting for the worker pool
    max_key_uploads: int = 1      # key sets being read and parsed at once

    def __post_init__(self) -> None:
        for name in ("max_clients", "keys_per_hospital", "max_queue", "max_key_uploads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be ≥ 1, got {getattr(self, name)}")
        if self.keys_per_hospital > self.max_clients:
            raise ConfigError(f"`keys_per_hospital` ({self.keys_per_hospital}) must not exceed `max_clients` "
                              f"({self.max_clients})")
        if not self.key_idle_s >= 0:
            raise ConfigError(f"`key_idle_s` must be ≥ 0, got {self.key_idle_s}")


class RefusalError(Exception):
    """A request the service refuses: the HTTP status, a short error name, the detail and extra headers."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, min(3600, math.ceil(seconds))))}


@dataclass
class _KeySet:
    hospital: str
    pool_id: str        # the worker pool's id of these keys (sha256 of the blob)
    last_used: float


@dataclass(frozen=True)
class Admission:
    """A registration's outcome: the hospital's key id, whether it is new, and pool ids no longer used."""

    key_id: str
    new: bool
    released: tuple[str, ...] = ()
    evicted: str | None = None   # the key id that left for this one


@dataclass
class KeyRegistry:
    """Which hospital holds which key sets, and who may leave when a hospital registers more (no SEAL here).

    Key ids are per hospital (a hash of the hospital's name and its keys), so two hospitals
    never share one, and a lookup with another hospital's id finds nothing.
    """

    limits: ServiceLimits
    clock: Callable[[], float] = time.monotonic
    _sets: OrderedDict[str, _KeySet] = field(default_factory=OrderedDict)   # least recently used first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key_id_for(hospital: str, pool_id: str) -> str:
        """The id a hospital uses for its keys."""
        return hospital_key_id(hospital, pool_id)

    def __len__(self) -> int:
        return len(self._sets)

    def lookup(self, hospital: str, kid: str, *, touch: bool = True) -> str | None:
        """The pool id of ``hospital``'s key set ``kid`` (marked used), or None: unknown or not its own."""
        with self._lock:
            entry = self._sets.get(kid)
            if entry is None or entry.hospital != hospital:
                return None
            if touch:
                entry.last_used = self.clock()
                self._sets.move_to_end(kid)
            return entry.pool_id

    def _victim(self, hospital: str) -> str | None:
        """The key id that must leave for ``hospital`` to add one; raises a 503 when nobody may leave."""
        own = [k for k, e in self._sets.items() if e.hospital == hospital]
        if len(own) >= self.limits.keys_per_hospital:
            return own[0]
        if len(self._sets) < self.limits.max_clients:
            return None
        now = self.clock()
        for k, e in self._sets.items():   # least recently used first
            if now - e.last_used >= self.limits.key_idle_s:
                return k
        oldest = min(e.last_used for e in self._sets.values())
        raise RefusalError(503, "key_capacity", f"all {self.limits.max_clients} key sets are in use by other "
                           "hospitals; retry later", _retry_after(self.limits.key_idle_s - (now - oldest)))

    def check_room(self, hospital: str) -> None:
        """Raise the 503 :meth:`admit` would raise for a first key set of ``hospital`` (before reading its body).

        A hospital that holds a key set is let through: it may be sending the same keys again,
        which :meth:`admit` accepts without room.
        """
        with self._lock:
            if not any(e.hospital == hospital for e in self._sets.values()):
                self._victim(hospital)

    def admit(self, hospital: str, pool_id: str) -> Admission:
        """Add ``hospital``'s key set, evicting per the limits; ``released`` lists pool ids nobody holds now."""
        kid = self.key_id_for(hospital, pool_id)
        with self._lock:
            if kid in self._sets:
                self._sets[kid].last_used = self.clock()
                self._sets.move_to_end(kid)
                return Admission(kid, new=False)
            victim = self._victim(hospital)
            gone = self._sets.pop(victim) if victim is not None else None
            self._sets[kid] = _KeySet(hospital, pool_id, self.clock())
            held = {e.pool_id for e in self._sets.values()}
            released = (gone.pool_id,) if gone is not None and gone.pool_id not in held else ()
            if gone is not None:
                log.info("key set %s of %s released for %s's new one", victim, gone.hospital, hospital)
            return Admission(kid, new=True, released=released, evicted=victim)

    def drop(self, kid: str) -> str | None:
        """Remove a key id (a registration that failed); returns its pool id if nobody else holds it."""
        with self._lock:
            gone = self._sets.pop(kid, None)
            if gone is None or any(e.pool_id == gone.pool_id for e in self._sets.values()):
                return None
            return gone.pool_id


# -- the contract's models ------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every refusal: a short error name and a detail naming what is wrong."""

    error: str
    detail: str


class Health(BaseModel):
    """``GET /health``."""

    model_config = ConfigDict(extra="allow")
    status: str
    model_sha256: str
    clients_loaded: int


class Limits(BaseModel):
    """The limits in ``GET /model``."""

    max_key_bytes: int
    max_upload_bytes: int
    max_clients: int
    keys_per_hospital: int
    max_queue: int
    key_memory_bytes: int   # the most the loaded key sets may take (key_memory_bound)


class ModelInfo(BaseModel):
    """``GET /model``: the client's description of the model (no weights, no server paths)."""

    model_config = ConfigDict(extra="allow")
    params: dict[str, Any]
    params_sha256: str
    image_shape: list[int]
    transform: dict[str, Any]
    input_layout: dict[str, Any]
    classes: list[str]
    meta: dict[str, Any]
    model_sha256: str
    rotation_steps: list[int]
    input_ciphertexts: int
    depth: int
    workers: int
    limits: Limits


class KeysReply(BaseModel):
    """``POST /keys``: the key id to infer with, and whether these keys were new to the service."""

    key_id: str
    new: bool


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "Malformed body", 401: "No bearer token", 403: "Token not valid", 404: "Unknown key id",
            413: "Body larger than the model's bound", 415: "Body not application/octet-stream",
            422: "Keys or request unusable", 500: "Unexpected failure (logged)",
            503: "Busy or at capacity; retry after Retry-After seconds"}
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": ErrorBody, "description": what[c]}
        if c == 401:
            out[c]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if c == 503:
            out[c]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


def _binary_body(description: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description,
                            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}}}


# -- the app ------------------------------------------------------------------------------------------
@dataclass
class _Gate:
    """Admission to a scarce resource (event-loop side): how many are in, and the recent seconds per use."""

    capacity: int
    inside: int = 0
    seconds: float = 1.0

    def enter(self, what: str) -> None:
        if self.inside >= self.capacity:
            raise RefusalError(503, "busy", f"{self.inside} {what} already admitted (the limit); retry later",
                               _retry_after(self.seconds * self.inside))
        self.inside += 1

    def leave(self, seconds: float | None = None) -> None:
        self.inside -= 1
        if seconds is not None:
            self.seconds = 0.8 * self.seconds + 0.2 * seconds


def _first_line(exc: Exception, limit: int = 300) -> str:
    """An error's message for a response: its first line, cut (never a traceback)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _check_headers(request: Request, bound: int, what: str) -> None:
    """415 unless the body is octet-stream, 413 if its declared length exceeds ``bound`` (nothing read yet)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != OCTET:
        raise RefusalError(415, "unsupported_media_type", f"{what} must be sent as {OCTET}, got {ctype[:80] or 'none'}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > bound:
        raise RefusalError(413, "payload_too_large", f"{what} is {int(declared)} bytes; this model's bound is {bound}")


async def _read_body(request: Request, bound: int, what: str) -> bytes:
    """The body, streamed and cut at ``bound`` bytes (for a body sent without a length)."""
    _check_headers(request, bound, what)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > bound:
            raise RefusalError(413, "payload_too_large", f"{what} exceeds this model's bound of {bound} bytes")
        chunks.append(chunk)
    if not size:
        raise RefusalError(400, "empty_body", f"{what} is empty")
    return b"".join(chunks)


def create_app(model_path: Path, *, tokens: Path, workers: int = 2, limits: ServiceLimits | None = None,
               key_store: Path | None = None) -> FastAPI:
    """The service for one compiled model, its hospitals' tokens in ``tokens`` (plaintexts encoded once).

    ``key_store``: a folder where admitted key sets are kept (:mod:`~he_inference.keystore`)
    and reloaded from at start, so a hospital's key id stays valid across restarts; None:
    key sets live in memory only.
    """
    limits = limits or ServiceLimits()
    token_file = TokenFile(tokens)
    model = CompiledModel.load(Path(model_path))
    n_galois = len(galois_elements(model.key_steps, model.params.poly_degree))
    bounds = wire_bounds(model.params, n_galois=n_galois, n_inputs=model.plan.n_inputs)
    key_memory = key_memory_bound(model.params, n_galois=n_galois, workers=workers, max_clients=limits.max_clients,
                                  max_key_uploads=limits.max_key_uploads)
    machine = psutil.virtual_memory().total
    if key_memory > machine:
        raise ConfigError(f"`max_clients` {limits.max_clients}: up to {limits.max_clients} key sets of this model "
                          f"with {workers} worker(s) need {key_memory / 2**30:.1f} GiB, this machine has "
                          f"{machine / 2**30:.1f} GiB: lower --max-clients (or --workers)")
    server = InferenceServer(model, workers=workers, model_path=Path(model_path))
    registry = KeyRegistry(limits)
    pool = threading.Lock()   # one pool operation at a time: each encrypted pass already uses every worker
    store = KeyStore(key_store, params_sha256=model.params.digest()) if key_store is not None else None
    if store is not None:
        _reload(store, registry, server, model)
    infer_gate, keys_gate = _Gate(limits.max_queue), _Gate(limits.max_key_uploads)
    app = FastAPI(title="privrad encrypted inference", version="2", openapi_url=None, docs_url=None, redoc_url=None,
                  description="Encrypted classification: public evaluation keys and CKKS ciphertexts only. "
                              "Every endpoint but /health needs a hospital's bearer token.")
    described = model.client().to_dict()
    info: dict[str, Any] = {
        **described, "meta": {k: v for k, v in described["meta"].items() if k in PUBLIC_META},
        "input_ciphertexts": model.plan.n_inputs, "depth": model.depth, "workers": workers,
        "limits": {"max_key_bytes": bounds.key_bytes, "max_upload_bytes": bounds.upload_bytes,
                   "max_clients": limits.max_clients, "keys_per_hospital": limits.keys_per_hospital,
                   "max_queue": limits.max_queue, "key_memory_bytes": key_memory},
    }
    bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                        description="A hospital's token, issued with `privrad he token add`.")

    def hospital(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if creds is None:
            raise RefusalError(401, "unauthenticated", "send the hospital's token: Authorization: Bearer TOKEN",
                               BEARER_CHALLENGE)
        name = token_file.verify(creds.credentials)
        if name is None:
            raise RefusalError(403, "forbidden", "the bearer token is not valid (unknown or revoked)")
        return name

    @app.exception_handler(RefusalError)
    async def refused(_: Request, exc: RefusalError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "detail": detail[:500]}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected failure on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal_error", "detail": "the service failed on this request; the "
                             "operator's log has the details"}, status_code=500)

    @app.get("/health", response_model=Health, summary="Liveness and the worker pool's state (no token needed)",
             responses={503: {"model": Health, "description": "No HE worker is alive: the service cannot classify"}})
    def health() -> JSONResponse:
        pool = server.health()   # never waits for a running pass
        body = {"status": "ok" if pool.state is PoolState.OK else "degraded", "model_sha256": model.digest,
                "clients_loaded": len(registry), "pool": pool.to_dict()}
        return JSONResponse(body, status_code=200 if pool.alive else 503)

    @app.get("/model", response_model=ModelInfo, responses=_errors(401, 403, 500),
             summary="The model's description: what a client needs to encrypt")
    def model_info(_: Annotated[str, Depends(hospital)]) -> dict[str, Any]:
        return info

    @app.get("/openapi.json", include_in_schema=False)
    def contract(_: Annotated[str, Depends(hospital)]) -> JSONResponse:
        return JSONResponse(app.openapi())

    async def off_loop(fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn)

    @app.post("/keys", response_model=KeysReply, operation_id="register_keys",
              summary="Register this hospital's public evaluation keys",
              responses={**_errors(400, 401, 403, 413, 415, 422, 500, 503),
                         200: {"links": {"infer": {"operationId": "infer",
                                                   "parameters": {"key_id": "$response.body#/key_id"}}}}},
              openapi_extra=_binary_body(f"The hospital's public.keys container (at most {bounds.key_bytes} bytes "
                                         "for this model)."))
    async def register(request: Request, who: Annotated[str, Depends(hospital)]) -> dict[str, Any]:
        _check_headers(request, bounds.key_bytes, "the evaluation keys")
        registry.check_room(who)   # before reading hundreds of MB the service could not keep
        keys_gate.enter("key uploads")
        t0 = time.perf_counter()
        try:
            blob = await _read_body(request, bounds.key_bytes, "the evaluation keys")
            pool_id = await off_loop(partial(key_id, blob))
            known = registry.key_id_for(who, pool_id)
            if registry.lookup(who, known) is not None:   # the same keys again: nothing to load
                return {"key_id": known, "new": False}
            keys = await off_loop(partial(_parse_keys, blob, model))
            return await off_loop(partial(_add, who, pool_id, keys))
        finally:
            keys_gate.leave(time.perf_counter() - t0)

    def _add(who: str, pool_id: str, keys: PublicKeys) -> dict[str, Any]:
        with pool:
            admission = registry.admit(who, pool_id)
            try:
                for old in admission.released:
                    server.forget(old)
                if admission.new:
                    server.register(keys)
            except HEError as exc:
                released = registry.drop(admission.key_id)
                if released is not None:
                    server.forget(released)
                raise _he_refusal(exc, "registering the keys") from exc
            if store is not None and admission.new:
                _persist(store, admission, who, pool_id, keys.blob)
        log.info("%s registered key set %s (new: %s)", who, admission.key_id, admission.new)
        return {"key_id": admission.key_id, "new": admission.new}

    @app.post("/infer/{key_id}", operation_id="infer", response_class=Response,
              summary="Classify one encrypted image with a registered key set",
              responses={**_errors(400, 401, 403, 404, 413, 415, 422, 500, 503),
                         200: {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
                               "description": "The encrypted-logits container",
                               "headers": {"X-Privrad-Seconds": {"schema": {"type": "string"},
                                                                 "description": "Server-side seconds"}}}},
              openapi_extra=_binary_body(f"An encrypted-image container (at most {bounds.upload_bytes} bytes for "
                                         "this model)."))
    async def infer(key_id: Annotated[str, PathParam(pattern=KEY_ID_PATTERN)], request: Request,
                    who: Annotated[str, Depends(hospital)]) -> Response:
        if registry.lookup(who, key_id) is None:
            raise _unknown(key_id)
        _check_headers(request, bounds.upload_bytes, "the encrypted image")
        infer_gate.enter("inference requests")
        t0 = time.perf_counter()
        try:
            upload = await _read_body(request, bounds.upload_bytes, "the encrypted image")

            def run() -> tuple[bytes, float]:
                with pool:
                    pool_id = registry.lookup(who, key_id)
                    if pool_id is None:   # evicted while it waited
                        raise _unknown(key_id)
                    start = time.perf_counter()
                    reply, _ = server.infer(upload, key_id=pool_id)
                    return reply, time.perf_counter() - start

            try:
                reply, seconds = await off_loop(run)
            except HEError as exc:
                raise _he_refusal(exc, "the encrypted pass") from exc
        finally:
            infer_gate.leave(time.perf_counter() - t0)
        return Response(reply, media_type=OCTET, headers={"X-Privrad-Seconds": f"{seconds:.3f}"})

    app.state.inference = server   # closed by the caller (serve() does it on shutdown)
    app.state.bounds = bounds
    return app


def _persist(store: KeyStore, admission: Admission, who: str, pool_id: str, blob: bytes) -> None:
    """Keep an admitted key set on disk and drop the one it replaced; a disk failure is logged, not fatal."""
    try:
        if admission.evicted is not None:
            store.remove(admission.evicted)
        store.save(admission.key_id, hospital=who, pool_id=pool_id, blob=blob)
    except OSError as exc:   # the keys still serve from memory; after a restart the hospital uploads them again
        log.error("could not keep key set %s in %s: %s", admission.key_id, store.root, exc)


def _reload(store: KeyStore, registry: KeyRegistry, server: InferenceServer, model: CompiledModel) -> None:
    """Admit and load the stored key sets, oldest first; one that fails is named in the log and skipped."""
    loaded = 0
    for entry in store.entries():
        try:
            keys = require_keys_for(PublicKeys.from_bytes(entry.blob, model.params, source=f"stored {entry.key_id}"),
                                    model.params, model.plan.steps)
        except (KeyMaterialError, CiphertextError) as exc:
            log.warning("stored key set %s of %s is not usable with this model and is skipped: %s", entry.key_id,
                        entry.hospital, _first_line(exc))
            continue
        try:
            admission = registry.admit(entry.hospital, entry.pool_id)
        except RefusalError:
            log.warning("more stored key sets than --max-clients: %s of %s and later ones are not loaded",
                        entry.key_id, entry.hospital)
            break
        for old in admission.released:
            server.forget(old)
        if admission.evicted is not None:
            store.remove(admission.evicted)
        if admission.new:
            server.register(keys)
            loaded += 1
    if loaded:
        log.info("reloaded %d stored key set(s) from %s", loaded, store.root)


def _unknown(kid: str) -> RefusalError:
    return RefusalError(404, "unknown_key_id", f"no evaluation keys of this hospital under {kid[:32]!r}: "
                        "POST /keys first (keys may have been replaced or released)")


def _parse_keys(blob: bytes, model: CompiledModel) -> PublicKeys:
    """Parse and check a key set (runs in a thread): 400 for a malformed one, 422 for unusable keys."""
    try:
        keys = PublicKeys.from_bytes(blob, model.params, source="the uploaded keys")
        return require_keys_for(keys, model.params, model.plan.steps)
    except KeyMaterialError as exc:
        raise RefusalError(422, "bad_keys", _first_line(exc)) from exc
    except CiphertextError as exc:
        raise RefusalError(400, "malformed_keys", _first_line(exc)) from exc


def _he_refusal(exc: HEError, what: str) -> RefusalError:
    """The response for an HEError: the client's fault (400, 422) or the pool's (503, logged, generic)."""
    if isinstance(exc, CiphertextError):
        return RefusalError(400, "bad_ciphertext", _first_line(exc))
    if isinstance(exc, KeyMaterialError):
        return RefusalError(422, "cannot_evaluate", _first_line(exc))
    log.error("%s failed on the worker pool", what, exc_info=exc)
    return RefusalError(503, "he_unavailable", f"{what} failed on the server's worker pool (logged); retry later",
                        _retry_after(5))


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_path: Path, *, tokens: Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          tls_cert: Path | None = None, tls_key: Path | None = None, insecure: bool = False,
          limits: ServiceLimits | None = None, progress: Callable[[str], None] | None = None,
          key_store: Path | None = None) -> None:
    """Run the service with uvicorn until interrupted; the worker pool is stopped on the way out.

    ``key_store``: where registered key sets are kept across restarts (:func:`create_app`).

    The settings are checked first (``progress`` hears when the slow start begins).

    Raises
    ------
    ConfigError
        Half a TLS pair, plaintext HTTP on a non-loopback host without ``insecure``, or no
        readable tokens file.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both `--tls-cert` and `--tls-key`")
    if tls_cert is None and not is_loopback(host) and not insecure:
        raise ConfigError(f"`--host` {host} is not a loopback address and no TLS is set: on plaintext HTTP anyone on "
                          "the path reads the bearer tokens and can alter the (malleable) CKKS ciphertexts. Give "
                          "--tls-cert and --tls-key, or --insecure behind your own TLS terminator")
    if insecure and tls_cert is None and not is_loopback(host):
        log.warning("serving plaintext HTTP on %s (--insecure): put a TLS terminator in front", host)
    TokenFile(tokens)   # a missing or unreadable tokens file stops here, before the model is encoded
    if progress is not None:
        progress(f"encoding the model and starting {workers} worker(s) …")
    app = create_app(model_path, tokens=tokens, workers=workers, limits=limits, key_store=key_store)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)
    finally:
        app.state.inference.close()
