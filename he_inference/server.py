"""The server's side of encrypted inference on the wire containers.

:class:`InferenceServer` is built from a compiled model and :class:`PublicKeys` only; it
refuses any other key material, ciphertexts made for other parameters or another model, and
runs on one process or several (:mod:`he_inference.parallel`). Every upload is checked by
:func:`~he_inference.keys.load_upload` before any work starts, on both paths, and whatever SEAL
raises later is a named :class:`~federation.errors.HEError`; :meth:`InferenceServer.health`
reports a :class:`~he_inference.parallel.PoolHealth` either way. The client's side (encrypt,
decrypt, the service client) is :mod:`he_inference.client`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from federation.errors import KeyMaterialError
from he_inference.artifact import CompiledModel
from he_inference.engine import Engine, LayerTiming
from he_inference.keys import PublicKeys, key_id, load_upload, pack_ciphertexts, require_keys_for
from he_inference.parallel import START_TIMEOUT_S, ParallelEngine, PoolHealth, PoolState
from he_inference.serial import ContainerKind

__all__ = ["InferenceServer"]


class InferenceServer:
    """Runs one compiled model on encrypted images; holds public evaluation keys only."""

    def __init__(self, model: CompiledModel, keys: PublicKeys | None = None, *, workers: int = 1,
                 model_path: Path | None = None, progress: Callable[[str], None] | None = None,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        """Encode the model once; ``keys`` (optional) are registered under the key id ``""``.

        With ``workers`` > 1 the pool must start within ``start_timeout`` seconds per worker
        (:class:`~he_inference.parallel.ParallelEngine`), or an HEError names the worker.
        """
        self.model = model
        self.workers = max(1, int(workers))
        # Parsed key sets are held only where a pass runs: here with one worker; with a pool, in the
        # workers (the coordinator keeps the ids, and the pool the serialised blobs for a respawn).
        self._keysets: dict[str, PublicKeys] = {}
        self._key_ids: set[str] = set()
        if keys is not None:
            keys = require_keys_for(keys, model.params, model.plan.steps)
            self._key_ids.add("")
            if self.workers == 1:
                self._keysets[""] = keys
        self._pool: ParallelEngine | None = None
        self._engine: Engine | None = None
        self._tmpfile: str | None = None
        self._passes = self._failures = 0
        if self.workers == 1:
            self._engine = Engine(model, keys, progress=progress)
            self.encode_seconds = self._engine.encode_seconds
        else:
            if model_path is None:
                fd, self._tmpfile = tempfile.mkstemp(suffix=".he", prefix="privrad-")
                os.close(fd)
                model_path = Path(self._tmpfile)
                model.save(model_path)
            try:
                self._pool = ParallelEngine(model, model_path, keys, workers=self.workers, progress=progress,
                                            start_timeout=start_timeout)
            except BaseException:
                self.close()   # the temporary model file
                raise
            self.encode_seconds = self._pool.encode_seconds

    def register(self, keys: PublicKeys) -> str:
        """Add another client's evaluation keys (the encoded model is shared); returns its key id."""
        keys = require_keys_for(keys, self.model.params, self.model.plan.steps)
        kid = key_id(keys.blob)
        if kid not in self._key_ids:
            if self._pool is not None:
                self._pool.add_keys(kid, keys)
            else:
                self._keysets[kid] = keys
            self._key_ids.add(kid)
        return kid

    def forget(self, key_id: str) -> None:
        """Release a client's evaluation keys (not the ones the server was built with)."""
        if key_id and key_id in self._key_ids:
            self._key_ids.discard(key_id)
            self._keysets.pop(key_id, None)
            if self._pool is not None:
                self._pool.forget_keys(key_id)

    def infer(self, upload: bytes, *, key_id: str = "", progress: Callable[[str, int, int], None] | None = None
              ) -> tuple[bytes, list[LayerTiming]]:
        """``encrypted-image`` container → (``encrypted-logits`` container, per-layer timings).

        ``key_id`` picks registered keys (default: the keys the server was built with).

        Raises
        ------
        CiphertextError
            The upload is refused (names what is wrong), or SEAL refuses an operand.
        KeyMaterialError
            No keys under ``key_id``.
        WorkerLostError
            A pool worker died during the pass (it is respawned; retry).
        HEError
            Any other reason the pass cannot go on (named).
        """
        if key_id not in self._key_ids:
            raise KeyMaterialError(f"no evaluation keys registered under {key_id[:32]!r}")
        if self._pool is not None:
            return self._pool.infer(upload, key_id=key_id, progress=progress)
        assert self._engine is not None
        m = self.model
        keys = self._keysets[key_id]
        cts = load_upload(upload, m.params, keys.context, model_sha256=m.digest, n_inputs=m.plan.n_inputs)
        self._engine.use_keys(keys)
        try:
            outs, timings = self._engine.run(cts, progress=progress)
        except BaseException:
            self._failures += 1
            raise
        self._passes += 1
        reply = pack_ciphertexts(outs, ContainerKind.ENCRYPTED_LOGITS, m.params, model_sha256=m.digest,
                                 classes=list(m.classes))
        return reply, timings

    @property
    def pids(self) -> tuple[int | None, ...]:
        """The processes that run the passes: the pool's workers, or this process when ``workers`` is 1."""
        return self._pool.pids if self._pool is not None else (os.getpid(),)

    def health(self) -> PoolHealth:
        """Workers alive, respawns, state and pass counters (one in-process worker when ``workers`` is 1)."""
        if self._pool is not None:
            return self._pool.health()
        return PoolHealth(1, 1, 0, PoolState.OK, self._passes, self._failures)

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
