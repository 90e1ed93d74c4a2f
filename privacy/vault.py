"""Protected image storage: de-identified, losslessly compressed DICOM sealed with AES-256-GCM per site.

An object in the vault is one slice:

1. **De-identified** by keeping only the attributes needed to rebuild a valid CT image
   (:data:`KEEP`: pixel module, rescale, geometry, modality) and replacing every UID with a
   new one, which removes every attribute of the DICOM Basic Application Level
   Confidentiality Profile (PS3.15 Table E.1-1) that the image does not need; Patient's
   Name and ID become the object's pseudonym, and the file records the profile it applied
   (Patient Identity Removed, De-identification Method Code Sequence: DCM 113100).
2. **Compressed losslessly** to JPEG 2000 (pydicom + pylibjpeg-openjpeg): the pixel data
   come back bit-exact.
3. **Sealed** with AES-256-GCM (``cryptography``) under the site's active key. The small
   header (object id, site, key id, sizes) is authenticated as associated data; the file
   name, the pixel hash and the de-identified DICOM are inside the ciphertext.

Every object is written atomically; tampering, a wrong key or a truncated file raise a
:class:`VaultError` that says which, never garbage. :func:`rotate_key` re-seals a site's
objects under a new key and only then drops the old one, so an interrupted rotation is
resumed by running it again.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000Lossless, generate_uid

from federation.errors import DataError, VaultError
from federation.storage import atomic_write_bytes

__all__ = [
    "KEEP",
    "Keyring",
    "ObjectInfo",
    "VaultError",
    "deidentify",
    "get_object",
    "list_objects",
    "put_file",
    "rotate_key",
]

MAGIC = b"PRIVRAD-VAULT\x01"
NONCE_BYTES = 12
TAG_BYTES = 16
KEYRING_FORMAT = "privrad-keyring/1"

KEEP = (
    "SOPClassUID", "Modality", "ImageType", "BodyPartExamined", "SliceThickness", "KVP",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
)
"""Attributes a vault object keeps; everything else (private tags included) is dropped."""


# ----------------------------------------------------------------------------- de-identification
def deidentify(ds: Dataset, *, pseudonym: str) -> Dataset:
    """A new dataset with only :data:`KEEP`, fresh UIDs, ``pseudonym`` as patient, and the profile recorded.

    Raises
    ------
    DataError
        The dataset has no pixel data or lacks an attribute of the image pixel module.
    """
    if "PixelData" not in ds:
        raise DataError(None, "the DICOM dataset has no Pixel Data to store")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel",
                           "PhotometricInterpretation") if k not in ds]
    if missing:
        raise DataError(None, f"the DICOM dataset lacks {', '.join(missing)}")
    out = Dataset()
    for keyword in KEEP:
        if keyword in ds:
            out[keyword] = ds[keyword]
    sop = generate_uid()
    out.SOPInstanceUID = sop
    out.StudyInstanceUID = generate_uid()
    out.SeriesInstanceUID = generate_uid()
    out.FrameOfReferenceUID = generate_uid()
    out.PatientName = pseudonym
    out.PatientID = pseudonym
    out.PatientIdentityRemoved = "YES"
    method = Dataset()
    method.CodeValue = "113100"
    method.CodingSchemeDesignator = "DCM"
    method.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = DicomSequence([method])
    out.DeidentificationMethod = "privrad vault: attribute whitelist, new UIDs"
    compressed = "TransferSyntaxUID" in getattr(ds, "file_meta", {}) and ds.file_meta.TransferSyntaxUID.is_compressed
    out.PixelData = ds.pixel_array.tobytes() if compressed else ds.PixelData
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID if "SOPClassUID" in out else pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    out.file_meta = meta
    return out


# ----------------------------------------------------------------------------- keys
@dataclass
class Keyring:
    """A site's AES-256 keys (one active); a file of mode 600 that stays at the site."""

    path: Path
    site: str
    keys: dict[str, bytes]
    active: str

    @classmethod
    def create(cls, path: Path, *, site: str) -> Keyring:
        """A new keyring with one fresh key; refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise VaultError(f"{path} exists: refusing to overwrite a keyring (its keys open stored objects)")
        kid = secrets.token_hex(8)
        ring = cls(path, site, {kid: AESGCM.generate_key(bit_length=256)}, kid)
        ring.save()
        return ring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a keyring file.

        Raises
        ------
        VaultError
            Missing, unreadable or not a keyring.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != KEYRING_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            keys = {k: base64.b64decode(v) for k, v in d["keys"].items()}
            if d["active"] not in keys or any(len(v) != 32 for v in keys.values()):
                raise ValueError("active key missing or a key is not 256 bits")
            return cls(path, str(d["site"]), keys, str(d["active"]))
        except FileNotFoundError:
            raise VaultError(f"{path}: no such keyring") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise VaultError(f"{path}: not a privrad keyring ({exc})") from None

    def save(self) -> None:
        """Write atomically with mode 600."""
        body = {"format": KEYRING_FORMAT, "site": self.site, "active": self.active,
                "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}}
        atomic_write_bytes(self.path, (json.dumps(body, indent=2) + "\n").encode())
        os.chmod(self.path, 0o600)

    def key(self, kid: str) -> bytes:
        """The key ``kid``.

        Raises
        ------
        VaultError
            This keyring does not hold it.
        """
        if kid not in self.keys:
            raise VaultError(f"the object is sealed under key {kid}, which keyring {self.path} (site {self.site}) "
                             f"does not hold: wrong keyring, or a key already retired")
        return self.keys[kid]


# ----------------------------------------------------------------------------- sealed objects
@dataclass(frozen=True)
class ObjectInfo:
    """The authenticated, unencrypted header of a vault object (no patient data)."""

    object_id: str
    site: str
    key_id: str
    created: str
    original_bytes: int
    sealed_bytes: int
    codec: str = "jpeg2000-lossless"

    def header(self) -> bytes:
        """Canonical bytes (the GCM associated data)."""
        d = {k: v for k, v in self.__dict__.items() if k != "sealed_bytes"}
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _seal(info: ObjectInfo, payload: bytes, key: bytes) -> bytes:
    header = info.header()
    nonce = secrets.token_bytes(NONCE_BYTES)
    body = AESGCM(key).encrypt(nonce, payload, MAGIC + header)
    return MAGIC + struct.pack(">I", len(header)) + header + nonce + body


def _parse_header(head: bytes, where: Path, size: int) -> tuple[ObjectInfo, bytes, int]:
    """Header, its raw bytes and where the nonce starts, from the first bytes of an object of ``size`` bytes."""
    if not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise VaultError(f"{where}: truncated ({size} bytes)")
        raise VaultError(f"{where}: not a privrad vault object (or its start was damaged)")
    off = len(MAGIC)
    if len(head) < off + 4:
        raise VaultError(f"{where}: truncated ({size} bytes)")
    (hlen,) = struct.unpack(">I", head[off:off + 4])
    off += 4
    if size < off + hlen + NONCE_BYTES + TAG_BYTES or len(head) < off + hlen:
        raise VaultError(f"{where}: truncated ({size} bytes, header says more)")
    raw = head[off:off + hlen]
    try:
        d = json.loads(raw)
        info = ObjectInfo(**d, sealed_bytes=size)
    except (ValueError, TypeError) as exc:
        raise VaultError(f"{where}: damaged header ({exc})") from None
    return info, raw, off + hlen


def _parse(blob: bytes, where: Path) -> tuple[ObjectInfo, bytes, bytes, bytes]:
    """Header, the raw header bytes, nonce and ciphertext of ``blob``."""
    info, raw, off = _parse_header(blob, where, len(blob))
    return info, raw, blob[off:off + NONCE_BYTES], blob[off + NONCE_BYTES:]


def _open(blob: bytes, keyring: Keyring, where: Path) -> tuple[ObjectInfo, bytes]:
    info, raw, nonce, body = _parse(blob, where)
    if info.site != keyring.site:
        raise VaultError(f"{where}: object of site {info.site}, keyring of site {keyring.site}")
    try:
        payload = AESGCM(keyring.key(info.key_id)).decrypt(nonce, body, MAGIC + raw)
    except InvalidTag:
        raise VaultError(f"{where}: authentication failed: the object was modified or truncated, or the key "
                         f"{info.key_id} in {keyring.path} is not the one it was sealed with") from None
    return info, payload


def _pack_payload(meta: dict[str, Any], dicom: bytes) -> bytes:
    m = json.dumps(meta, sort_keys=True).encode()
    return struct.pack(">I", len(m)) + m + dicom


def _unpack_payload(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack(">I", payload[:4])
    return json.loads(payload[4:4 + n]), payload[4 + n:]


def _objects(vault: Path) -> Path:
    return Path(vault) / "objects"


def put_file(vault: Path, source: Path, keyring: Keyring) -> ObjectInfo:
    """De-identify, compress and seal one DICOM file into ``vault``; return its header.

    Raises
    ------
    DataError
        ``source`` is not a readable DICOM image.
    """
    source = Path(source)
    try:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many unrelated types for a bad file
        raise DataError(source, f"is not a readable DICOM image ({exc})") from None
    object_id = uuid.uuid4().hex
    clean = deidentify(ds, pseudonym=f"vault-{object_id[:12]}")
    clean.compress(JPEG2000Lossless, generate_instance_uid=False)
    buf = io.BytesIO()
    clean.save_as(buf, enforce_file_format=True)
    meta = {"source_name": source.name, "pixel_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
            .hexdigest(), "dtype": str(pixels.dtype), "shape": list(pixels.shape)}
    info = ObjectInfo(object_id=object_id, site=keyring.site, key_id=keyring.active,
                      created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                      original_bytes=source.stat().st_size, sealed_bytes=0)
    blob = _seal(info, _pack_payload(meta, buf.getvalue()), keyring.key(keyring.active))
    atomic_write_bytes(_objects(vault) / f"{object_id}.pvo", blob)
    return ObjectInfo(**{**info.__dict__, "sealed_bytes": len(blob)})


def get_object(vault: Path, object_id: str, keyring: Keyring) -> tuple[Dataset, dict[str, Any]]:
    """Open an object: the de-identified dataset (JPEG 2000) and its sealed metadata, pixels verified.

    Raises
    ------
    VaultError
        Unknown id, tampering, truncation, wrong key, or pixels that do not match their hash.
    """
    path = _objects(vault) / f"{object_id}.pvo"
    if not path.is_file():
        raise VaultError(f"{vault}: no object {object_id}")
    _, payload = _open(path.read_bytes(), keyring, path)
    meta, dicom = _unpack_payload(payload)
    ds = pydicom.dcmread(io.BytesIO(dicom))
    if hashlib.sha256(np.ascontiguousarray(ds.pixel_array).tobytes()).hexdigest() != meta["pixel_sha256"]:
        raise VaultError(f"{path}: decoded pixels differ from the sealed hash")
    return ds, meta


def list_objects(vault: Path) -> Iterator[ObjectInfo]:
    """Headers of every object (no key needed; headers hold no patient data)."""
    folder = _objects(vault)
    for path in sorted(folder.glob("*.pvo")) if folder.is_dir() else []:
        with path.open("rb") as fh:
            head = fh.read(len(MAGIC) + 4)
            if len(head) == len(MAGIC) + 4 and head.startswith(MAGIC):
                head += fh.read(struct.unpack(">I", head[len(MAGIC):])[0])
        yield _parse_header(head, path, path.stat().st_size)[0]


def rotate_key(vault: Path, keyring: Keyring, *, progress: Callable[[int], None] | None = None) -> int:
    """Re-seal every object of the keyring's site under a new key, then drop the old keys; return the count.

    Crash-safe: the new key is saved (as active, beside the old ones) before any object is
    re-sealed, each object is replaced atomically, and old keys are removed last.
    """
    new = secrets.token_hex(8)
    keyring.keys[new] = AESGCM.generate_key(bit_length=256)
    keyring.active = new
    keyring.save()
    count = 0
    for info in list(list_objects(vault)):
        if info.site != keyring.site or info.key_id == new:
            continue
        path = _objects(vault) / f"{info.object_id}.pvo"
        old_info, payload = _open(path.read_bytes(), keyring, path)
        fresh = ObjectInfo(**{**old_info.__dict__, "key_id": new, "sealed_bytes": 0})
        atomic_write_bytes(path, _seal(fresh, payload, keyring.key(new)))
        count += 1
        if progress is not None:
            progress(1)
    keyring.keys = {new: keyring.keys[new]}
    keyring.save()
    return count
