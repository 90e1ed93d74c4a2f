"""The hospital's side of encrypted inference: encrypt → (post) → decrypt.

:func:`encrypt_image` and :func:`decrypt_logits` need the client's :class:`SecretKeys`;
:class:`ServiceClient` runs them against the encrypted-inference service. The secret key
stays in the client's key folder; the service gets the public evaluation keys once (it
answers a key id) and then only ciphertexts.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from federation.errors import ConfigError, HEError
from federation.storage import atomic_write_json
from he_inference.artifact import ClientModel, CompiledModel, MetaKey
from he_inference.images import read_image
from he_inference.keys import SECRET_FILE, SecretKeys
from he_inference.passes.ir import Array

__all__ = ["TOKEN_ENV", "Classification", "Prediction", "ServiceClient", "decrypt_logits", "encrypt_image",
           "load_token", "prediction", "softmax"]

OCTET = "application/octet-stream"


def encrypt_image(model: CompiledModel | ClientModel, keys: SecretKeys, image: Array) -> bytes:
    """One image (C, H, W) in [0, 1] → the upload (``encrypted-image`` container)."""
    image = np.asarray(image, dtype=np.float64)
    if image.shape != tuple(model.image_shape):
        raise HEError(f"image shape {image.shape} does not match the model's input {tuple(model.image_shape)}")
    if not np.all(np.isfinite(image)):
        raise HEError("image holds NaN or infinite values")
    if not isinstance(keys, SecretKeys):
        raise HEError("encryption needs the client's SecretKeys")
    return keys.encrypt(model.pack(image), model_sha256=model.digest)


def decrypt_logits(model: CompiledModel | ClientModel, keys: SecretKeys, data: bytes, *,
                   source: str = "<bytes>") -> Array:
    """The server's reply → logits, one per class."""
    return keys.decrypt(data, model_sha256=model.digest, source=source)


def softmax(logits: Array) -> Array:
    """Class probabilities from logits (last axis)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Prediction:
    """The decrypted answer for one image: predicted class, probabilities and logits by class name."""

    label: str
    probabilities: dict[str, float]
    logits: dict[str, float]

    def __post_init__(self) -> None:
        if self.label not in self.probabilities or set(self.probabilities) != set(self.logits):
            raise ValueError(f"`label` {self.label!r} must be one of the classes that `probabilities` and `logits` "
                             "both name")

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``prediction``, ``probabilities``, ``logits``."""
        return {"prediction": self.label, "probabilities": dict(self.probabilities), "logits": dict(self.logits)}


def prediction(logits: Array, classes: Sequence[str]) -> Prediction:
    """The answer for one image's logits; unnamed classes are called by their index."""
    p = softmax(logits)
    names = list(classes) or [str(k) for k in range(len(p))]
    return Prediction(names[int(p.argmax())], dict(zip(names, map(float, p), strict=True)),
                      dict(zip(names, map(float, logits), strict=True)))


@dataclass(frozen=True)
class Classification:
    """One image classified through the service: the answer, sizes and timings."""

    prediction: Prediction
    server_s: float           # the service's encrypted forward pass (its X-Privrad-Seconds)
    round_trip_s: float       # encrypt + post + decrypt
    upload_bytes: int
    download_bytes: int
    image: str | None = None  # the file it was read from, if any

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``image`` first, when known)."""
        head = {} if self.image is None else {"image": self.image}
        return {**head, **self.prediction.to_dict(), "server_s": self.server_s, "round_trip_s": self.round_trip_s,
                "upload_bytes": self.upload_bytes, "download_bytes": self.download_bytes}


TOKEN_ENV = "PRIVRAD_HE_TOKEN"
KEY_IDS_FILE = "service-keys.json"   # in the key folder: the key id each service gave these keys


def load_token(token_file: Path | None = None) -> str:
    """The hospital's bearer token: the first line of ``token_file``, else the ``PRIVRAD_HE_TOKEN`` variable.

    Raises
    ------
    ConfigError
        Neither gives a token.
    """
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise ConfigError(f"`--token-file` {path}: no such file")
        lines = path.read_text().strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"`--token-file` {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no token: give --token-file FILE or set {TOKEN_ENV} (the operator issues one with "
                          "`privrad he token add HOSPITAL`)")
    return token


class ServiceClient:
    """A connection to one encrypted-inference service, with this hospital's token and keys.

    Registers the hospital's evaluation keys on first contact with a service (the key id is
    kept in the key folder's ``service-keys.json``, so the hospital's other clients reuse it),
    and again (once, then retries) when the service answers ``unknown_key_id`` (its keys were
    replaced or released); a 503 is retried after its ``Retry-After`` until ``timeout``.
    """

    def __init__(self, url: str, keys_dir: Path, *, token: str, ca_cert: Path | None = None,
                 timeout: float = 900.0, keys: SecretKeys | None = None) -> None:
        """Connect; ``keys`` (already loaded from ``keys_dir``) lets several clients of a hospital share them."""
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        self.timeout = timeout
        self.http = httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout,
                                 headers={"authorization": f"Bearer {token}"})
        self.model = ClientModel.from_dict(self._send("GET", "/model").json())
        keys_dir = Path(keys_dir)
        if keys is not None:
            if keys.params != self.model.params:
                raise HEError("the keys given are for other CKKS parameters than the service's model")
            self.keys = keys
        elif (keys_dir / SECRET_FILE).is_file():
            self.keys = SecretKeys.load(keys_dir, self.model.params)
        else:  # first contact: make this hospital's keys for the served model
            self.keys = SecretKeys.generate(self.model.params, self.model.steps)
            self.keys.save(keys_dir)
        self._ids_file = keys_dir / KEY_IDS_FILE
        self._service = f"{self.http.base_url}#{self.model.digest}"
        self.registrations = 0
        self.key_id = self._known_ids().get(self._service, "")
        if not self.key_id:   # the keys are sent once per service; the id is kept in the key folder
            self.register()

    def _known_ids(self) -> dict[str, str]:
        try:
            ids = json.loads(self._ids_file.read_text())
            return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}
        except (OSError, ValueError):
            return {}

    def register(self) -> str:
        """Send the public evaluation keys (``POST /keys``); returns and keeps the key id."""
        reply = self._send("POST", "/keys", content=self.keys.public_bytes(), headers={"content-type": OCTET})
        self.key_id = str(reply.json()["key_id"])
        self.registrations += 1
        atomic_write_json(self._ids_file, {**self._known_ids(), self._service: self.key_id})
        return self.key_id

    def _send(self, method: str, path: str, *, content: bytes | None = None,
              headers: dict[str, str] | None = None, refused_ok: tuple[str, ...] = ()) -> httpx.Response:
        """One request; 503s retried after Retry-After; an error whose name is in ``refused_ok`` is returned."""
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self.http.request(method, path, content=content, headers=headers)
            if reply.status_code != 503 or time.monotonic() > deadline:
                break
            wait = reply.headers.get("retry-after", "1")
            time.sleep(min(float(wait) if wait.isdigit() else 1.0, max(0.0, deadline - time.monotonic()), 30.0))
        if reply.status_code >= 400:
            try:
                body = reply.json()
                error, detail = str(body.get("error")), str(body.get("detail"))
            except ValueError:
                error, detail = "", reply.text[:200]
            if error in refused_ok:
                return reply
            raise HEError(f"{method} {path} refused ({reply.status_code}) — {error}: {detail}")
        return reply

    def classify(self, image: Array, *, name: str | None = None) -> Classification:
        """One image (C, H, W) in [0, 1] → probabilities, logits, sizes and timings."""
        t0 = time.perf_counter()
        upload = encrypt_image(self.model, self.keys, image)
        reply = self._send("POST", f"/infer/{self.key_id}", content=upload, headers={"content-type": OCTET},
                           refused_ok=("unknown_key_id",))
        if reply.status_code == 404:   # keys replaced or released on the service: register again, once
            self.register()
            reply = self._send("POST", f"/infer/{self.key_id}", content=upload, headers={"content-type": OCTET})
        logits = decrypt_logits(self.model, self.keys, reply.content, source="service reply")
        return Classification(prediction(logits, self.model.classes),
                              float(reply.headers.get("X-Privrad-Seconds", "nan")), time.perf_counter() - t0,
                              len(upload), len(reply.content), name)

    def classify_files(self, paths: Sequence[Path]) -> list[Classification]:
        """DICOM slices (or .npy arrays), preprocessed as the model was trained."""
        return [self.classify(read_image(p, self.model.meta.get(MetaKey.PREPROCESS, {})), name=str(p)) for p in paths]

    def close(self) -> None:
        """Close the HTTP connection."""
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
