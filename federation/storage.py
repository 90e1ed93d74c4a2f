"""Crash-safe files: atomic writes, and model checkpoints with metadata and a hash.

A write goes to a temporary file in the destination folder, is flushed to disk and then
renamed over the target, and the folder itself is flushed so that the rename survives a
power cut: a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from federation.errors import ModelError
from federation.model import ArchConfig, PrivradCNN, build_model

__all__ = ["Checkpoint", "atomic_write_bytes", "atomic_write_json", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "privrad-model"
CHECKPOINT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model with its metadata."""

    model: PrivradCNN
    meta: dict[str, Any]
    sha256: str


def save_checkpoint(path: Path, model: PrivradCNN, *, meta: dict[str, Any]) -> str:
    """Save state dict + metadata atomically; returns the file's SHA-256.

    ``meta`` must hold plain types (it is loaded with ``weights_only=True``); the
    architecture is added from the model itself.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": model.config.to_dict(),
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    ModelError
        Missing file, not a privrad checkpoint, unknown version or mismatched weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    data = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ModelError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a privrad model checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ModelError(f"{path}: checkpoint version {payload.get('version')} is not "
                         f"supported (expected {CHECKPOINT_VERSION})")
    model = build_model(ArchConfig.from_dict(payload["arch"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the architecture ({exc})") from exc
    model.eval()
    return Checkpoint(model=model, meta=payload["meta"], sha256=hashlib.sha256(data).hexdigest())
