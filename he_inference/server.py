"""Both ends of encrypted inference on the wire containers.

Client: :func:`encrypt_image` / :func:`decrypt_logits` (they need :class:`SecretKeys`).
Server: :class:`InferenceServer`, built from a compiled model and :class:`PublicKeys` only;
it refuses any other key material, ciphertexts made for other parameters or another model,
and runs on one process or several (:mod:`he_inference.parallel`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from federation.errors import HEError, KeyMaterialError
from he_inference.compiler import ClientModel, CompiledModel
from he_inference.engine import Engine, LayerTiming
from he_inference.keys import (
    INPUT_KIND,
    OUTPUT_KIND,
    PublicKeys,
    SecretKeys,
    key_id,
    load_ciphertexts,
    pack_ciphertexts,
    require_keys_for,
)
from he_inference.parallel import ParallelEngine

__all__ = ["InferenceServer", "decrypt_logits", "encrypt_image", "prediction", "softmax"]

Array = npt.NDArray[np.float64]


def encrypt_image(model: CompiledModel | ClientModel, keys: SecretKeys, image: Array) -> bytes:
    """Client: one image (C, H, W) in [0, 1] → the upload (``encrypted-image`` container)."""
    image = np.asarray(image, dtype=np.float64)
    if image.shape != tuple(model.image_shape):
        raise HEError(f"image shape {image.shape} does not match the model's input {tuple(model.image_shape)}")
    if not np.all(np.isfinite(image)):
        raise HEError("image holds NaN or infinite values")
    if not isinstance(keys, SecretKeys):
        raise HEError("encryption needs the client's SecretKeys")
    return keys.encrypt(model.pack(image), model_sha256=model.digest)


def softmax(logits: Array) -> Array:
    """Class probabilities from logits (last axis)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def prediction(logits: Array, classes: Sequence[str]) -> dict[str, Any]:
    """The decrypted answer for one image: predicted class, probabilities and logits by class name."""
    p = softmax(logits)
    names = list(classes) or [str(k) for k in range(len(p))]
    return {"prediction": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p), strict=True)),
            "logits": dict(zip(names, map(float, logits), strict=True))}


def decrypt_logits(model: CompiledModel | ClientModel, keys: SecretKeys, data: bytes, *,
                   source: str = "<bytes>") -> Array:
    """Client: the server's reply → logits, one per class."""
    return keys.decrypt(data, model_sha256=model.digest, source=source)


class InferenceServer:
    """Runs one compiled model on encrypted images; holds public evaluation keys only."""

    def __init__(self, model: CompiledModel, keys: PublicKeys | None = None, *, workers: int = 1,
                 model_path: Path | None = None, progress: Callable[[str], None] | None = None) -> None:
        """Encode the model once; ``keys`` (optional) are registered under the key id ``""``."""
        self.model = model
        self.workers = max(1, int(workers))
        self._keysets: dict[str, PublicKeys] = {}
        if keys is not None:
            keys = require_keys_for(keys, model.params, model.plan.steps)
            self._keysets[""] = keys
        self._pool: ParallelEngine | None = None
        self._engine: Engine | None = None
        self._tmpfile: str | None = None
        if self.workers == 1:
            self._engine = Engine(model.plan, model.params, keys, progress=progress)
            self.encode_seconds = self._engine.encode_seconds
        else:
            if model_path is None:
                fd, self._tmpfile = tempfile.mkstemp(suffix=".he", prefix="privrad-")
                os.close(fd)
                model_path = Path(self._tmpfile)
                model.save(model_path)
            try:
                self._pool = ParallelEngine(model, model_path, keys, workers=self.workers, progress=progress)
            except BaseException:
                self.close()   # the temporary model file
                raise
            self.encode_seconds = self._pool.encode_seconds

    def register(self, keys: PublicKeys) -> str:
        """Add another client's evaluation keys (the encoded model is shared); returns its key id."""
        keys = require_keys_for(keys, self.model.params, self.model.plan.steps)
        kid = key_id(keys.blob)
        if kid not in self._keysets:
            if self._pool is not None:
                self._pool.add_keys(kid, keys)
            self._keysets[kid] = keys
        return kid

    def forget(self, key_id: str) -> None:
        """Release a client's evaluation keys (not the ones the server was built with)."""
        if key_id and self._keysets.pop(key_id, None) is not None and self._pool is not None:
            self._pool.forget_keys(key_id)

    @property
    def key_ids(self) -> list[str]:
        """Registered key ids (the construction keys are ``""``)."""
        return list(self._keysets)

    def infer(self, upload: bytes, *, key_id: str = "", progress: Callable[[str, int, int], None] | None = None
              ) -> tuple[bytes, list[LayerTiming]]:
        """``encrypted-image`` container → (``encrypted-logits`` container, per-layer timings).

        ``key_id`` picks registered keys (default: the keys the server was built with).
        """
        if key_id not in self._keysets:
            raise KeyMaterialError(f"no evaluation keys registered under {key_id[:32]!r}")
        if self._pool is not None:
            return self._pool.infer(upload, key_id=key_id, progress=progress)
        assert self._engine is not None
        m = self.model
        keys = self._keysets[key_id]
        self._engine.use_keys(keys)
        cts = load_ciphertexts(upload, INPUT_KIND, m.params, keys.context, model_sha256=m.digest, source="upload")
        outs, timings = self._engine.run(cts, progress=progress)
        return pack_ciphertexts(outs, OUTPUT_KIND, m.params, model_sha256=m.digest, classes=list(m.classes)), timings

    def close(self) -> None:
        """Stop worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._tmpfile is not None:
            Path(self._tmpfile).unlink(missing_ok=True)
            self._tmpfile = None

    def __enter__(self) -> InferenceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
