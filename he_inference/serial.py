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
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CiphertextError(f"{source}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise CiphertextError(f"{source}: not a privrad HE file (expected {kind})")
    first, _, rest = data[len(MAGIC):].partition(b"\n")
    found_kind, _, version = first.decode(errors="replace").partition(" v")
    if found_kind != kind:
        raise CiphertextError(f"{source}: holds {found_kind[:40]}, expected {kind}")
    if version != str(VERSION):
        raise CiphertextError(f"{source}: format version {version[:12]}, this privrad reads version {VERSION}")
    line, _, body = rest.partition(b"\n")
    head, sizes = _header(line, source)
    if sum(k for _, k in sizes) != len(body) or hashlib.sha256(body).hexdigest() != head.get("body_sha256"):
        raise CiphertextError(f"{source}: truncated or modified (body does not match its hash)")
    for field, want in expect.items():
        if head.get(field) != want:
            raise CiphertextError(f"{source}: {field} is {str(head.get(field))[:12]}…, expected {want[:12]}…: "
                                  f"made for other {'CKKS parameters' if field == 'params_sha256' else 'model'}")
    parts: dict[str, bytes] = {}
    start = 0
    for name, k in sizes:
        parts[name] = body[start:start + k]
        start += k
    return head, parts


def _header(line: bytes, source: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The JSON header and its part list (name, size); anything else is a CiphertextError.

    Untrusted input: deep nesting (RecursionError), ``Infinity`` sizes (OverflowError), a
    header that is not an object, sizes that are not non-negative integers and repeated part
    names are all refused here, so that nothing but a CiphertextError leaves :func:`unpack`.
    """
    try:
        head = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise CiphertextError(f"{source}: unreadable header ({type(exc).__name__})") from exc
    if not isinstance(head, dict):
        raise CiphertextError(f"{source}: unreadable header (a JSON {type(head).__name__}, expected an object)")
    raw = head.get("parts")
    if not isinstance(raw, list):
        raise CiphertextError(f"{source}: unreadable header (`parts` is {type(raw).__name__}, expected a list)")
    sizes: list[tuple[str, int]] = []
    for n, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0):
            raise CiphertextError(f"{source}: unreadable header (`parts[{n}]` must be [name, size ≥ 0], "
                                  f"got {str(entry)[:40]})")
        sizes.append((entry[0], entry[1]))
    names = [name for name, _ in sizes]
    if len(set(names)) != len(names):
        raise CiphertextError(f"{source}: part names repeat ({names[:8]})")
    if not isinstance(head.get("body_sha256"), str):
        raise CiphertextError(f"{source}: unreadable header (`body_sha256` is not a string)")
    return head, sizes
