"""Protected image storage: de-identified, losslessly compressed DICOM sealed with AES-256-GCM per site.

An object in the vault is one slice:

1. **De-identified** by keeping only the attributes needed to rebuild a valid CT image
   (:data:`KEEP`: pixel module, rescale, geometry, modality) and replacing every UID with a
   new one, which removes every attribute of the DICOM Basic Application Level
   Confidentiality Profile (PS3.15 Table E.1-1) that the image does not need; Patient's
   Name and ID become the object's pseudonym. The profile covers attributes, not pixels:
   a slice whose pixels may show burned-in text (:func:`assess_burned_in`) is refused, or,
   when the caller allows it, sealed *flagged*: it then records Patient Identity Removed
   NO and claims no profile (in the DICOM and in the object's header).
2. **Compressed losslessly** to JPEG 2000 (pydicom + pylibjpeg-openjpeg): the pixel data
   come back bit-exact.
3. **Sealed** with AES-256-GCM (``cryptography``) under the site's active key. The header
   (format version, object id, site, key id, the source's keyed pseudonym, the burned-in
   flag, sizes) is the associated data, so an object is bound to its id: a file copied
   over another object's file is refused. The pixel hash and the de-identified DICOM are
   inside the ciphertext. The source file's name is stored nowhere; only its keyed
   pseudonym (:meth:`Keyring.pseudonym`) is.

Object ids are 32 lowercase hex digits (:func:`check_object_id`); any other id is refused
before a path is built from it. Every object is written atomically (and its folder
fsynced); tampering, a wrong key, a swapped or truncated file raise a
:class:`VaultError` that says which, never garbage. Writers hold a lock on the vault
(``put`` shared, ``rotate`` exclusive, ``fcntl.flock`` on ``VAULT/.lock``), so a put
never seals under a key that a rotation is retiring. :func:`rotate_key` re-seals a
site's objects under a new key, re-scans until none uses an old key and only then drops
the old keys, so an interrupted rotation is resumed by running it again.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000Lossless, generate_uid

from federation.errors import DataError, DicomError, VaultError
from federation.ingest import read_dicom
from federation.storage import atomic_write_bytes

__all__ = [
    "KEEP",
    "OBJECT_ID",
    "BurnedIn",
    "Keyring",
    "ObjectInfo",
    "VaultError",
    "assess_burned_in",
    "check_object_id",
    "deidentify",
    "get_object",
    "list_objects",
    "put_file",
    "rotate_key",
]

MAGIC_PREFIX = b"PRIVRAD-VAULT"
FORMAT_VERSION = 2
MAGIC = MAGIC_PREFIX + bytes([FORMAT_VERSION])
NONCE_BYTES = 12
TAG_BYTES = 16
KEYRING_FORMAT = "privrad-keyring/2"
LOCK_NAME = ".lock"
PSEUDONYM_HEX = 16
"""A source pseudonym keeps 16 hex digits (64 bits) of its HMAC-SHA256."""

OBJECT_ID = re.compile(r"[0-9a-f]{32}")
"""An object id: 32 lowercase hex digits (a uuid4 in hex); the whole id must match."""

KEEP = (
    "SOPClassUID", "Modality", "ImageType", "BodyPartExamined", "SliceThickness", "KVP",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
    "BurnedInAnnotation",
)
"""Attributes a vault object keeps; everything else (private tags, dates, descriptions) is dropped."""

BURNED_IN_TAG = "(0028,0301) Burned In Annotation"
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
"""Secondary Capture Image Storage SOP classes (screen captures, scanned documents, multi-frame SC)."""
ANNOTATED_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "SM", "OT", "DOC"})
"""Modalities whose images often carry burned-in text (ultrasound, angiography, photographs, documents)."""


class BurnedIn(enum.StrEnum):
    """What is known of text burned into a slice's pixels (Burned In Annotation, (0028,0301))."""

    NO = "no"
    """The header says NO."""
    ABSENT = "absent"
    """Not stated, on an original image of a modality where burned-in text is rare (e.g. CT ORIGINAL\\PRIMARY)."""
    YES = "yes"
    """The header says YES: the pixels show text, which may identify the patient."""
    UNKNOWN = "unknown"
    """Not stated, on an image where burned-in text is common (secondary capture, derived, ultrasound, ...)."""

    @property
    def safe(self) -> bool:
        """Whether the de-identification profile may be claimed for such pixels."""
        return self in (BurnedIn.NO, BurnedIn.ABSENT)


def _risk(ds: Dataset) -> str | None:
    """Why a slice without Burned In Annotation may still carry burned-in text; ``None`` when it is unlikely."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).strip()
    image_type = [str(v).strip() for v in (ds.get("ImageType") or [])]
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return "Secondary Capture image"
    if modality in ANNOTATED_MODALITIES:
        return f"{modality} image"
    if image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"]:
        return "\\".join(image_type) + " image"
    return None


def assess_burned_in(ds: Dataset) -> BurnedIn:
    """How far a slice's pixels can be trusted to hold no text: the header's word, or its image type's risk.

    ``YES`` and ``NO`` are taken from Burned In Annotation; without it, a Secondary Capture
    image, a ``DERIVED`` or ``SECONDARY`` image type, or a modality in
    :data:`ANNOTATED_MODALITIES` is ``UNKNOWN``, anything else ``ABSENT``.
    """
    stated = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if stated == "YES":
        return BurnedIn.YES
    if stated == "NO":
        return BurnedIn.NO
    return BurnedIn.UNKNOWN if _risk(ds) is not None else BurnedIn.ABSENT


def _refuse_burned_in(ds: Dataset, state: BurnedIn, source: Path) -> None:
    if state is BurnedIn.YES:
        problem = "is YES: the pixels may show identifying text"
    else:
        problem = (f"is absent on a {_risk(ds)}, where identifying text is often burned into the pixels; "
                   "set it to NO once the pixels are checked")
    raise DicomError(source, f"{problem}; or seal it flagged, without the de-identification claim, with "
                             "--allow-burned-in (allow_burned_in=True)", tag=BURNED_IN_TAG)


# ----------------------------------------------------------------------------- de-identification
def deidentify(ds: Dataset, *, pseudonym: str) -> Dataset:
    """A new dataset with only :data:`KEEP`, fresh UIDs, ``pseudonym`` as patient, and what was done recorded.

    The Basic Application Confidentiality Profile (DCM 113100) and Patient Identity
    Removed YES are claimed only when :func:`assess_burned_in` finds the pixels safe;
    otherwise Patient Identity Removed is NO and De-identification Method says why.

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
    burned_in = assess_burned_in(ds)
    if burned_in.safe:
        out.PatientIdentityRemoved = "YES"
        method = Dataset()
        method.CodeValue = "113100"
        method.CodingSchemeDesignator = "DCM"
        method.CodeMeaning = "Basic Application Confidentiality Profile"
        out.DeidentificationMethodCodeSequence = DicomSequence([method])
        out.DeidentificationMethod = "privrad vault: attribute whitelist, new UIDs"
    else:
        out.PatientIdentityRemoved = "NO"
        out.DeidentificationMethod = ["privrad vault: attribute whitelist, new UIDs",
                                      f"burned-in annotation {burned_in.value}: pixels not de-identified"]
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
    """A site's AES-256 keys (one active) and its pseudonym key; a file of mode 600 that stays at the site.

    The pseudonym key never changes (a rotation replaces the AES keys only), so a source
    keeps its pseudonym for the life of the keyring.
    """

    path: Path
    site: str
    keys: dict[str, bytes]
    active: str
    pseudonym_key: bytes

    @classmethod
    def create(cls, path: Path, *, site: str) -> Keyring:
        """A new keyring with one fresh key and a fresh pseudonym key; refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise VaultError(f"{path} exists: refusing to overwrite a keyring (its keys open stored objects)")
        kid = secrets.token_hex(8)
        ring = cls(path, site, {kid: AESGCM.generate_key(bit_length=256)}, kid, secrets.token_bytes(32))
        ring.save()
        return ring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a keyring file.

        Raises
        ------
        VaultError
            Missing, unreadable, not a keyring, or a keyring of an older format.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") == "privrad-keyring/1":
                raise VaultError(f"{path}: keyring format 'privrad-keyring/1' is from before vault objects were bound "
                                 f"to their ids (format {FORMAT_VERSION}): create a new keyring and put the "
                                 "sources again")
            if d.get("format") != KEYRING_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            keys = {k: base64.b64decode(v) for k, v in d["keys"].items()}
            pseudonym_key = base64.b64decode(d["pseudonym_key"])
            if d["active"] not in keys or any(len(v) != 32 for v in (*keys.values(), pseudonym_key)):
                raise ValueError("active key missing or a key is not 256 bits")
            return cls(path, str(d["site"]), keys, str(d["active"]), pseudonym_key)
        except FileNotFoundError:
            raise VaultError(f"{path}: no such keyring") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VaultError(f"{path}: not a privrad keyring ({exc})") from None

    def save(self) -> None:
        """Write atomically (temp file of mode 600, fsync, rename, fsync of the folder)."""
        body = {"format": KEYRING_FORMAT, "site": self.site, "active": self.active,
                "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()},
                "pseudonym_key": base64.b64encode(self.pseudonym_key).decode()}
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

    def pseudonym(self, name: str) -> str:
        """``src-`` and 16 hex digits of HMAC-SHA256(pseudonym key, ``name``): one name, one pseudonym."""
        digest = hmac.new(self.pseudonym_key, name.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return f"src-{digest[:PSEUDONYM_HEX]}"


def _on_disk(keyring: Keyring) -> Keyring:
    """The keyring as its file holds it now (another process may have rotated since ``keyring`` was loaded).

    Raises
    ------
    VaultError
        The file is missing or belongs to another site.
    """
    fresh = Keyring.load(keyring.path)
    if fresh.site != keyring.site:
        raise VaultError(f"{keyring.path}: keyring of site {fresh.site} now, not {keyring.site}")
    return fresh


@contextlib.contextmanager
def _locked(vault: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``VAULT/.lock``: shared for a put, exclusive for a rotation (released on exit, and by the OS on a crash)."""
    vault = Path(vault)
    vault.mkdir(parents=True, exist_ok=True)
    fd = os.open(vault / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------- sealed objects
def check_object_id(object_id: object) -> str:
    """``object_id`` if it is 32 lowercase hex digits (:data:`OBJECT_ID`).

    Raises
    ------
    VaultError
        Anything else (``../x``, an absolute path, upper case, another length), named by its repr.
    """
    if not isinstance(object_id, str) or OBJECT_ID.fullmatch(object_id) is None:
        shown = repr(object_id)
        shown = shown if len(shown) <= 60 else f"{shown[:57]}... ({len(shown)} characters)"
        raise VaultError(f"object id {shown} is not 32 lowercase hex digits")
    return object_id


def _object_path(vault: Path, object_id: str) -> Path:
    return Path(vault) / "objects" / f"{check_object_id(object_id)}.pvo"


@dataclass(frozen=True)
class ObjectInfo:
    """The authenticated, unencrypted header of a vault object (no patient data).

    ``pseudonym`` is the source's keyed pseudonym (:meth:`Keyring.pseudonym`), never its
    name; ``profile`` is whether the object claims the de-identification profile (false
    when ``burned_in`` is ``yes`` or ``unknown``).
    """

    object_id: str
    site: str
    key_id: str
    created: str
    original_bytes: int
    sealed_bytes: int
    pseudonym: str
    burned_in: BurnedIn
    profile: bool
    codec: str = "jpeg2000-lossless"
    format: int = FORMAT_VERSION

    def header(self) -> bytes:
        """Canonical bytes (the GCM associated data, after the magic)."""
        d = {k: v for k, v in self.__dict__.items() if k != "sealed_bytes"}
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


_HEADER_TYPES: dict[str, type] = {"object_id": str, "site": str, "key_id": str, "created": str, "original_bytes": int,
                                  "pseudonym": str, "burned_in": str, "profile": bool, "codec": str, "format": int}


def _info_from(raw: bytes, size: int) -> ObjectInfo:
    """An :class:`ObjectInfo` from header bytes, every field present and of its type."""
    d = json.loads(raw)
    if not isinstance(d, dict) or set(d) != set(_HEADER_TYPES):
        raise ValueError(f"fields {sorted(d) if isinstance(d, dict) else type(d).__name__}")
    for name, kind in _HEADER_TYPES.items():
        if type(d[name]) is not kind:
            raise ValueError(f"{name} is {d[name]!r}")
    check_object_id(d["object_id"])
    return ObjectInfo(**{**d, "burned_in": BurnedIn(d["burned_in"])}, sealed_bytes=size)


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
        if head.startswith(MAGIC_PREFIX) and len(head) > len(MAGIC_PREFIX):
            raise VaultError(f"{where}: vault object format {head[len(MAGIC_PREFIX)]}, this privrad reads format "
                             f"{FORMAT_VERSION} only (format 1 objects are not bound to their ids: put the sources "
                             "again)")
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
        info = _info_from(raw, size)
    except (ValueError, TypeError, VaultError) as exc:
        raise VaultError(f"{where}: damaged header ({exc})") from None
    return info, raw, off + hlen


def _open(blob: bytes, keyring: Keyring, where: Path, object_id: str) -> tuple[ObjectInfo, bytes]:
    """Header and payload of the object that the file ``where`` of id ``object_id`` holds."""
    info, raw, off = _parse_header(blob, where, len(blob))
    if info.object_id != object_id:
        raise VaultError(f"{where}: object file {object_id} holds object {info.object_id} (copied or swapped): "
                         "refused")
    if info.site != keyring.site:
        raise VaultError(f"{where}: object of site {info.site}, keyring of site {keyring.site}")
    if info.key_id not in keyring.keys and keyring.path.is_file():
        keyring = _on_disk(keyring)  # rotated by another process since this keyring was loaded
    nonce, body = blob[off:off + NONCE_BYTES], blob[off + NONCE_BYTES:]
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


def _pixel_hash(pixels: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def put_file(vault: Path, source: Path, keyring: Keyring, *, allow_burned_in: bool = False) -> ObjectInfo:
    """De-identify, compress and seal one DICOM file into ``vault``; return its header.

    The object is sealed under the key that is active in the keyring's file at that moment
    (read under the vault's shared lock, so a concurrent rotation cannot retire it).

    Parameters
    ----------
    vault
        The vault folder.
    source
        A DICOM slice. Its name is not stored: the header keeps its keyed pseudonym.
    keyring
        The site's keyring; its file must exist.
    allow_burned_in
        Seal a slice whose pixels may show text (:func:`assess_burned_in` ``yes`` or
        ``unknown``), flagged and without the de-identification claim, instead of refusing it.

    Raises
    ------
    DataError
        ``source`` is not a readable DICOM image (:class:`~federation.errors.DicomError`
        citing the tag at fault), or its pixels may show text and ``allow_burned_in`` is false.
    VaultError
        The keyring's file is missing or unusable.
    """
    source = Path(source)
    ds = read_dicom(source)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many unrelated types for bad pixel data
        raise DicomError(source, f"cannot be decoded ({exc})", tag="(7FE0,0010) Pixel Data") from None
    burned_in = assess_burned_in(ds)
    if not burned_in.safe and not allow_burned_in:
        _refuse_burned_in(ds, burned_in, source)
    object_id = uuid.uuid4().hex
    clean = deidentify(ds, pseudonym=f"vault-{object_id[:12]}")
    buf = io.BytesIO()
    try:
        clean.compress(JPEG2000Lossless, generate_instance_uid=False)
        clean.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # pydicom's encoders, like its decoders, raise many unrelated types
        raise DicomError(source, f"cannot be compressed to JPEG 2000 lossless ({exc})",
                         tag="(7FE0,0010) Pixel Data") from None
    pseudonym = keyring.pseudonym(source.name)
    meta = {"pseudonym": pseudonym, "pixel_sha256": _pixel_hash(pixels), "dtype": str(pixels.dtype),
            "shape": list(pixels.shape)}
    payload = _pack_payload(meta, buf.getvalue())
    with _locked(vault, exclusive=False):
        ring = _on_disk(keyring)
        info = ObjectInfo(object_id=object_id, site=ring.site, key_id=ring.active,
                          created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                          original_bytes=source.stat().st_size, sealed_bytes=0, pseudonym=pseudonym,
                          burned_in=burned_in, profile=burned_in.safe)
        blob = _seal(info, payload, ring.key(ring.active))
        atomic_write_bytes(_object_path(vault, object_id), blob)
    return replace(info, sealed_bytes=len(blob))


def get_object(vault: Path, object_id: str, keyring: Keyring) -> tuple[Dataset, dict[str, Any]]:
    """Open an object: the de-identified dataset (JPEG 2000) and its sealed metadata, pixels verified.

    Raises
    ------
    VaultError
        An id that is not 32 lowercase hex digits (refused before any file is touched), an
        unknown id, a file that holds another object, tampering, truncation, wrong key,
        or pixels that do not match their hash.
    """
    path = _object_path(vault, object_id)
    if not path.is_file():
        raise VaultError(f"{vault}: no object {object_id}")
    _, payload = _open(path.read_bytes(), keyring, path, object_id)
    meta, dicom = _unpack_payload(payload)
    ds = pydicom.dcmread(io.BytesIO(dicom))
    if _pixel_hash(ds.pixel_array) != meta["pixel_sha256"]:
        raise VaultError(f"{path}: decoded pixels differ from the sealed hash")
    return ds, meta


def list_objects(vault: Path) -> Iterator[ObjectInfo]:
    """Headers of every object (no key needed; headers hold no patient data).

    Raises
    ------
    VaultError
        A file in ``objects/`` whose name is not an object id, whose header is truncated or
        damaged, or that holds another object than its name says.
    """
    folder = Path(vault) / "objects"
    for path in sorted(folder.glob("*.pvo")) if folder.is_dir() else []:
        try:
            check_object_id(path.stem)
        except VaultError as exc:
            raise VaultError(f"{path}: not a vault object's name ({exc})") from None
        with path.open("rb") as fh:
            head = fh.read(len(MAGIC) + 4)
            if len(head) == len(MAGIC) + 4 and head.startswith(MAGIC):
                head += fh.read(struct.unpack(">I", head[len(MAGIC):])[0])
        info = _parse_header(head, path, path.stat().st_size)[0]
        if info.object_id != path.stem:
            raise VaultError(f"{path}: object file {path.stem} holds object {info.object_id} (copied or swapped)")
        yield info


def rotate_key(vault: Path, keyring: Keyring, *, progress: Callable[[int], None] | None = None) -> int:
    """Re-seal every object of the keyring's site under a new key, then drop the old keys; return the count.

    Holds the vault's exclusive lock throughout, so no put runs meanwhile. Crash-safe: the
    new key is saved (as active, beside the old ones) before any object is re-sealed, each
    object is replaced atomically, the vault is re-scanned until no object of the site
    uses an old key, and old keys are removed last; an interrupted rotation is finished by
    running it again. ``keyring`` is updated to the saved state.
    """
    with _locked(vault, exclusive=True):
        ring = _on_disk(keyring)
        new = secrets.token_hex(8)
        ring.keys[new] = AESGCM.generate_key(bit_length=256)
        ring.active = new
        ring.save()
        count = 0
        while stale := [i for i in list_objects(vault) if i.site == ring.site and i.key_id != new]:
            for info in stale:
                path = _object_path(vault, info.object_id)
                old_info, payload = _open(path.read_bytes(), ring, path, info.object_id)
                atomic_write_bytes(path, _seal(replace(old_info, key_id=new, sealed_bytes=0), payload, ring.key(new)))
                count += 1
                if progress is not None:
                    progress(1)
        ring.keys = {new: ring.keys[new]}
        ring.save()
    keyring.keys, keyring.active, keyring.pseudonym_key = ring.keys, ring.active, ring.pseudonym_key
    return count
