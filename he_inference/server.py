"""Both ends of encrypted inference on the wire containers.

Client: :func:`encrypt_image` / :func:`decrypt_logits` (they need :class:`SecretKeys`).
Server: :class:`InferenceServer`, built from a compiled model and :class:`PublicKeys` only;
it refuses any other key material, ciphertexts made for other parameters or another model,
and runs on one process or several (:mod:`he_inference.parallel`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

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
    load_ciphertexts,
    pack_ciphertexts,
    require_public,
)
from he_inference.parallel import ParallelEngine

__all__ = ["InferenceServer", "decrypt_logits", "encrypt_image", "key_id_of"]

Array = npt.NDArray[np.float64]


def key_id_of(keys: PublicKeys) -> str:
    """A client's key id: the first 32 hex digits of its evaluation keys' sha256."""
    return hashlib.sha256(keys.blob).hexdigest()[:32]


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
            keys = require_public(keys)
            if keys.params != model.params:
                raise KeyMaterialError("these evaluation keys are for other CKKS parameters than the model's")
            keys.require_steps(model.plan.steps)
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
            self._pool = ParallelEngine(model_path, keys, workers=self.workers, progress=progress)
            if self._pool.model.digest != model.digest:
                self.close()
                raise HEError(f"{model_path} is not the model this server was given")
            self.encode_seconds = self._pool.encode_seconds

    def register(self, keys: PublicKeys) -> str:
        """Add another client's evaluation keys (the encoded model is shared); returns its key id."""
        keys = require_public(keys)
        if keys.params != self.model.params:
            raise KeyMaterialError("these evaluation keys are for other CKKS parameters than the model's")
        keys.require_steps(self.model.plan.steps)
        key_id = key_id_of(keys)
        if key_id not in self._keysets:
            if self._pool is not None:
                self._pool.add_keys(key_id, keys)
            self._keysets[key_id] = keys
        return key_id

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
