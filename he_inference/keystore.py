"""The service's registered evaluation keys on disk, so that a hospital uploads them once.

Evaluation keys are public material, but they are large (hundreds of MB for a deep model)
and a hospital should not resend them after every restart of the service. Each key set the
service admits is written here, under its key id:

* ``<key_id>.keys``: the ``public-keys`` container exactly as the hospital uploaded it;
* ``<key_id>.json``: who registered it (``hospital``), its pool id (the sha256 of the blob),
  the CKKS parameters' hash and when. Written last: a key set without it is incomplete (a
  crash between the two writes) and is not loaded.

Both writes are atomic (temp file, fsync, rename; mode 600) and one writer at a time holds
the folder's lock, so two service processes sharing a store never interleave. At start the
service reloads every entry for its parameters, oldest first, checking that the blob still
hashes to its pool id and that the key id is the hospital's: an entry that fails is named
in the log and skipped, and the service starts without it. A key set the service releases
(replaced, or evicted for another hospital) is deleted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from federation.storage import atomic_write_bytes, atomic_write_json
from he_inference.keys import key_id

__all__ = ["KeyStore", "StoredKeys", "hospital_key_id"]

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 60.0


def hospital_key_id(hospital: str, pool_id: str) -> str:
    """The id a hospital uses for its keys: a hash of its name and the keys' pool id."""
    return key_id(f"{hospital}\n{pool_id}".encode())


@dataclass(frozen=True)
class StoredKeys:
    """One stored key set, checked: the blob hashes to ``pool_id`` and ``key_id`` is ``hospital``'s."""

    key_id: str
    hospital: str
    pool_id: str
    blob: bytes
    registered: float


class KeyStore:
    """A folder of registered key sets for one set of CKKS parameters."""

    def __init__(self, root: Path, *, params_sha256: str) -> None:
        self.root = Path(root)
        self.params_sha256 = params_sha256
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)

    def save(self, kid: str, *, hospital: str, pool_id: str, blob: bytes) -> None:
        """Store a key set the service admitted (the blob first, its description last)."""
        with self._lock:
            atomic_write_bytes(self.root / f"{kid}.keys", blob)
            atomic_write_json(self.root / f"{kid}.json", {"hospital": hospital, "pool_id": pool_id,
                                                          "params_sha256": self.params_sha256,
                                                          "registered": time.time()})

    def remove(self, kid: str) -> None:
        """Delete a key set the service released (its description first: a half-deleted one is never loaded)."""
        with self._lock:
            (self.root / f"{kid}.json").unlink(missing_ok=True)
            (self.root / f"{kid}.keys").unlink(missing_ok=True)

    def entries(self) -> Iterator[StoredKeys]:
        """The stored key sets for these parameters, oldest first; a bad entry is logged by name and skipped."""
        found = []
        with self._lock:
            for meta_path in sorted(self.root.glob("*.json")):
                entry = self._read(meta_path)
                if entry is not None:
                    found.append(entry)
        yield from sorted(found, key=lambda e: e.registered)

    def _read(self, meta_path: Path) -> StoredKeys | None:
        kid = meta_path.stem
        try:
            meta = json.loads(meta_path.read_text())
            hospital, pool_id = str(meta["hospital"]), str(meta["pool_id"])
            params, registered = str(meta["params_sha256"]), float(meta["registered"])
            blob = (self.root / f"{kid}.keys").read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("stored key set %s is unreadable and is skipped: %s", meta_path, exc)
            return None
        if params != self.params_sha256:
            log.info("stored key set %s is for other CKKS parameters: not loaded", meta_path)
            return None
        if key_id(blob) != pool_id or hospital_key_id(hospital, pool_id) != kid:
            log.warning("stored key set %s does not hash to its ids (altered on disk?) and is skipped", meta_path)
            return None
        return StoredKeys(kid, hospital, pool_id, blob, registered)
