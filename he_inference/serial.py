r"""The wire format of keys and ciphertexts, and SEAL objects to and from bytes.

One container for everything that crosses the network or lands on disk::

    PRIVRAD-HE <kind> v<version>\n
    {"params_sha256": ..., "model_sha256": ..., "parts": [[name, nbytes], ...], "body_sha256": ...}\n
    <part bytes, concatenated>

The header binds the payload to one set of CKKS parameters (and, for ciphertexts, to one
compiled model); the body hash catches truncation and corruption. It is not a MAC: transport
authenticity is TLS's job. SEAL serialises only to file paths, so objects go through a
private temporary file, in RAM (``/dev/shm``) where the platform has one.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tenseal.sealapi as seal

from federation.errors import CiphertextError

__all__ = ["MAGIC", "SCRATCH_DIR", "VERSION", "ContainerKind", "pack", "seal_load", "seal_to_bytes", "unpack"]

VERSION = 1
MAGIC = b"PRIVRAD-HE "
SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None  # RAM, or default
T = TypeVar("T")


class ContainerKind(enum.StrEnum):
    """What a container holds (its first line names it)."""

    SECRET_KEYS = "secret-keys"
    PUBLIC_KEYS = "public-keys"
    ENCRYPTED_IMAGE = "encrypted-image"
    ENCRYPTED_LOGITS = "encrypted-logits"


def _scratch() -> str:
    fd, path = tempfile.mkstemp(dir=SCRATCH_DIR, prefix="privrad-he-")
    os.close(fd)
    return path


def seal_to_bytes(obj: Any) -> bytes:
    """SEAL's own serialisation of ``obj`` (anything with ``save(path)``), compressed as SEAL does."""
    path = _scratch()
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def seal_load(factory: Callable[[], T], context: seal.SEALContext, blob: bytes, *, what: str) -> T:
    """Load a SEAL object of the type ``factory`` builds; SEAL's validity check failing is a CiphertextError."""
    path = _scratch()
    try:
        Path(path).write_bytes(blob)
        obj = factory()
        try:
            obj.load(context, path)  # type: ignore[attr-defined]
        except (ValueError, RuntimeError) as exc:
            raise CiphertextError(f"{what}: SEAL rejects it for these parameters ({exc})") from exc
        return obj
    finally:
        os.unlink(path)


def pack(kind: ContainerKind, parts: Sequence[tuple[str, bytes]], **header: Any) -> bytes:
    """A container of ``kind`` holding ``parts`` (name, bytes) with ``header`` fields."""
    body = b"".join(b for _, b in parts)
    head = dict(header, parts=[[n, len(b)] for n, b in parts], body_sha256=hashlib.sha256(body).hexdigest())
    return MAGIC + f"{kind} v{VERSION}\n".encode() + json.dumps(head).encode() + b"\n" + body


def unpack(data: bytes, kind: ContainerKind, *, source: str = "<bytes>",
           **expect: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse a container, checking its kind, version, body hash and the ``expect``-ed header fields.

    Raises
    ------
    CiphertextError
        Not a container of this kind and version, truncated, tampered, or bound to other
        parameters or another model (the message names which field differs).
    """
    if not data.startswith(MAGIC):
        raise CiphertextError(f"{source}: not a privrad HE file (expected {kind})")
    first, _, rest = data[len(MAGIC):].partition(b"\n")
    found_kind, _, version = first.decode(errors="replace").partition(" v")
    if found_kind != kind:
        raise CiphertextError(f"{source}: holds {found_kind}, expected {kind}")
    if version != str(VERSION):
        raise CiphertextError(f"{source}: format version {version}, this privrad reads version {VERSION}")
    line, _, body = rest.partition(b"\n")
    try:
        head = json.loads(line)
        sizes = [(str(n), int(k)) for n, k in head["parts"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:   # RecursionError: deeply nested JSON
        raise CiphertextError(f"{source}: unreadable header ({exc})") from exc
    if sum(k for _, k in sizes) != len(body) or hashlib.sha256(body).hexdigest() != head.get("body_sha256"):
        raise CiphertextError(f"{source}: truncated or modified (body does not match its hash)")
    for field, want in expect.items():
        if head.get(field) != want:
            raise CiphertextError(f"{source}: {field} is {str(head.get(field))[:12]}…, expected {want[:12]}…: "
                                  f"made for other {'CKKS parameters' if field == 'params_sha256' else 'model'}")
    parts, start = {}, 0
    for name, k in sizes:
        parts[name] = body[start:start + k]
        start += k
    return head, parts
