"""Bearer tokens for the encrypted-inference service: one credential per hospital, only hashes on disk.

The operator issues each hospital a token (``privrad he token add HOSPITAL --tokens FILE``):
:meth:`TokenStore.add` draws 32 random bytes (:func:`secrets.token_urlsafe`), returns the
token once and keeps only its sha256 with the hospital's name. A token carries 256 bits of
entropy, so a fast hash is enough (nothing to brute-force; scrypt would only slow every
request). :meth:`TokenStore.verify` compares the presented token's hash with every record in
constant time (:func:`hmac.compare_digest`, no early exit) and answers the hospital's name.

The file is JSON, written atomically with owner-only permissions under a lock, so a running
service (which re-reads it when it changes, see :class:`TokenFile`) and ``he token add`` or
``revoke`` can share it: a revoked token stops working at the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from federation.errors import ConfigError
from federation.storage import atomic_write_bytes

__all__ = ["HOSPITAL_PATTERN", "TokenFile", "TokenRecord", "TokenStore", "token_digest"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "privrad-he-tokens", 1
HOSPITAL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DOMAIN = b"privrad-he-token\0"


def token_digest(token: str) -> str:
    """The hex sha256 the store keeps for ``token`` (domain-separated)."""
    return hashlib.sha256(_DOMAIN + token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """One issued token: the hospital it names, the token's hash and when it was issued."""

    hospital: str
    sha256: str
    created: str

    def __post_init__(self) -> None:
        if not re.fullmatch(HOSPITAL_PATTERN, self.hospital):
            raise ConfigError(f"`hospital` must match {HOSPITAL_PATTERN} (letters, digits, . _ -; at most 64), "
                              f"got {self.hospital!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError(f"`sha256` of {self.hospital}'s token must be 64 hex digits, got {self.sha256[:16]!r}")

    @property
    def fingerprint(self) -> str:
        """A short, harmless name of the token (the first 12 hex digits of its hash)."""
        return self.sha256[:12]

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"hospital": self.hospital, "sha256": self.sha256, "created": self.created}


@dataclass(frozen=True)
class TokenStore:
    """The tokens file's records (immutable: :meth:`add` and :meth:`revoke` write a new file)."""

    records: tuple[TokenRecord, ...] = ()

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read a tokens file; a missing or malformed one is a ConfigError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"`--tokens` {path}: no such file (issue tokens with `privrad he token add HOSPITAL "
                              f"--tokens {path}`)")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ConfigError(f"{path}: not a {FORMAT} v{VERSION} file")
            return cls(tuple(TokenRecord(str(r["hospital"]), str(r["sha256"]), str(r["created"]))
                             for r in doc["tokens"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: unreadable tokens file ({exc})") from exc

    def save(self, path: Path) -> None:
        """Write the file atomically, owner-only (mode 600)."""
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "tokens": [r.to_dict() for r in self.records]}
        atomic_write_bytes(Path(path), (json.dumps(doc, indent=2) + "\n").encode())   # mkstemp: created 600
        os.chmod(path, 0o600)

    @staticmethod
    def add(path: Path, hospital: str) -> str:
        """Issue a new token for ``hospital`` into the file at ``path`` (created if missing); returns the token.

        The token is returned once and never stored; a hospital may hold several (rotation).
        """
        token = secrets.token_urlsafe(32)
        record = TokenRecord(hospital, token_digest(token), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with _lock(path):
            store = TokenStore.load(path) if Path(path).is_file() else TokenStore()
            TokenStore((*store.records, record)).save(path)
        return token

    @staticmethod
    def revoke(path: Path, hospital: str) -> int:
        """Remove every token of ``hospital``; returns how many. None to remove is a ConfigError."""
        with _lock(path):
            store = TokenStore.load(path)
            kept = tuple(r for r in store.records if r.hospital != hospital)
            if len(kept) == len(store.records):
                raise ConfigError(f"`hospital` {hospital!r} holds no token in {path}")
            TokenStore(kept).save(path)
        return len(store.records) - len(kept)

    def verify(self, token: str) -> str | None:
        """The hospital ``token`` was issued to, or None; compares against every record in constant time."""
        digest = token_digest(token).encode()
        found = None
        for r in self.records:
            if hmac.compare_digest(digest, r.sha256.encode()):
                found = r.hospital
        return found


def _lock(path: Path) -> FileLock:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=30)


class TokenFile:
    """A tokens file as the service reads it: re-read whenever it changes on disk (revocation takes effect)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.store = TokenStore.load(self.path)   # a missing or malformed file is a ConfigError here
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def verify(self, token: str) -> str | None:
        """The hospital of ``token`` per the file's current content; a missing or unreadable file admits nobody."""
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self.store, self._stamp = TokenStore.load(self.path), stamp
        except (OSError, ConfigError) as exc:   # fail closed, and say so
            log.error("tokens file %s unreadable: refusing every token until it is fixed (%s)", self.path, exc)
            self.store, self._stamp = TokenStore(), (-1, -1, -1)
        return self.store.verify(token)
