"""One loader API for a hospital's images: DICOM folders, PNG/JPG class trees, MedMNIST ``.npz``.

Every layout ends as an :class:`ImageSet`: ``(N, 1, S, S)`` float32 images in ``[0, 1]``,
integer labels and the class names. CT pixel data go through the DICOM modality LUT to
Hounsfield units, then a CT window (abdomen W400/L40 by default), then a resize.

Bad input raises :class:`~federation.errors.DataError` (or a subclass) naming the file
and the problem, and the DICOM tag where one is at fault. Every header attribute privrad
reads (:data:`HEADER_KEYWORDS`) is parsed under its VR and value multiplicity first, so a
value such as ``"abc"`` in Rescale Slope (DS) or ``"1A"`` in Instance Number (IS) is a
:class:`~federation.errors.DicomError` citing the tag, never a bare ``ValueError`` from
deep inside pydicom. With ``on_error="skip"`` the bad file is left out and listed in
:attr:`ImageSet.skipped` with its reason: data are never dropped silently.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydicom.datadict import dictionary_description, dictionary_VM, tag_for_keyword
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.tag import BaseTag, Tag

from federation.errors import ConfigError, DataError, DicomError, LabelError
from federation.model import CLASSES

__all__ = [
    "HEADER_KEYWORDS",
    "ErrorPolicy",
    "ImageSet",
    "Preprocess",
    "SkippedFile",
    "apply_window",
    "concat",
    "load_dataset",
    "load_dicom_folder",
    "load_image_tree",
    "load_npz",
    "read_dicom",
    "read_dicom_hu",
    "read_slice",
    "tag_name",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_LABEL_ALIASES = {"tumor": "tumour"}
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

HEADER_KEYWORDS = (
    "Modality", "SOPClassUID", "ImageType", "BurnedInAnnotation", "InstanceNumber", "SliceThickness", "KVP",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SamplesPerPixel", "PhotometricInterpretation",
    "NumberOfFrames", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
)
"""The header attributes privrad reads (loaders, vault): each is checked under its VR by :func:`read_dicom`."""

_NEEDED = frozenset({"SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                     "BitsStored", "PixelRepresentation", "RescaleIntercept", "RescaleSlope"})
"""Attributes that may be absent but, when present, must not be empty (the pixels cannot be read without them)."""
_INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "IS"})
_HEADER_ERRORS = (ValueError, TypeError, OverflowError, struct.error, KeyError, IndexError, AttributeError,
                  BytesLengthException)
"""What pydicom raises when it converts a value that breaks its VR (it has no single error type for it)."""


class ErrorPolicy(enum.StrEnum):
    """What a loader does with a bad file."""

    RAISE = "raise"
    SKIP = "skip"


@dataclass(frozen=True)
class Preprocess:
    """Pixel pipeline shared by training and inference.

    Parameters
    ----------
    size
        Output side in pixels (images are resized to ``size x size``).
    window_center, window_width
        CT window in HU (default abdomen soft tissue, L40/W400).
    modality
        Expected DICOM Modality (0008,0060); ``None`` accepts any.
    """

    size: int = 64
    window_center: float = 40.0
    window_width: float = 400.0
    modality: str | None = "CT"

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 2048:
            raise ConfigError(f"`size` must be between 8 and 2048 pixels, got {self.size}")
        if self.window_width <= 0:
            raise ConfigError(f"`window_width` must be positive, got {self.window_width}")


@dataclass(frozen=True)
class SkippedFile:
    """A file a loader left out, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """Images ready for a CNN, with labels and provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    files: tuple[str, ...]
    skipped: tuple[SkippedFile, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def digest(self) -> str:
        """SHA-256 of the pixel data, labels and class names: identifies the training data."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        h.update("\0".join(self.classes).encode())
        return h.hexdigest()

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name."""
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))


# ----------------------------------------------------------------------------- pixel steps


def apply_window(hu: npt.NDArray[np.floating], center: float, width: float) -> npt.NDArray[np.float32]:
    """Map HU to ``[0, 1]`` with a linear window, clipping outside it."""
    lo = center - width / 2.0
    out: npt.NDArray[np.float32] = np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32)
    return out


def _resize(img: npt.NDArray[np.float32], size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t[0].clamp_(0.0, 1.0)


def _check_complete(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse a file that ends inside its data set (pydicom stops quietly at end of file)."""
    tags = list(ds.keys())
    if not tags:
        raise DicomError(path, "is truncated or corrupt: the file ends after its file meta header")
    last = ds.get_item(tags[-1])
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if (isinstance(length, int) and length != 0xFFFFFFFF and isinstance(value, bytes)
            and len(value) < length):
        raise DicomError(path, f"is truncated: {len(value)} of {length} bytes present",
                         tag=f"{last.tag} {pydicom.datadict.dictionary_description(last.tag)}")


def tag_name(tag: BaseTag | int | str) -> str:
    """``(gggg,eeee) Name`` as errors cite a tag: ``tag_name("RescaleSlope")`` is ``(0028,1053) Rescale Slope``."""
    t = Tag(tag)
    return f"({t.group:04X},{t.element:04X}) {dictionary_description(t)}"


def _shown(value: object) -> str:
    """A header value for an error message: its repr, cut at 60 characters."""
    text = repr(value.decode("latin-1") if isinstance(value, bytes) else value)
    return text if len(text) <= 60 else f"{text[:57]}... ({len(text)} characters)"


def _multiplicity_ok(vm: str, count: int) -> bool:
    """Whether ``count`` values fit the dictionary's value multiplicity ``vm`` ("1", "2", "1-n", "2-2n", "1-3")."""
    low, _, high = vm.partition("-")
    if not low.isdigit():
        return True
    if not high:
        return count == int(low)
    return count >= int(low) and (not high.isdigit() or count <= int(high))


def _check_value(path: Path, keyword: str, vr: str, value: object) -> None:
    """Refuse a converted value that breaks its VR or value multiplicity (pydicom keeps those as plain strings)."""
    name = tag_name(keyword)
    if value is None or value == "" or (isinstance(value, list | tuple) and not value):
        if keyword in _NEEDED:
            raise DicomError(path, "is empty: the pixel data cannot be read without it", tag=name)
        return
    values = list(value) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]
    whole = "\\".join(map(str, values)) if len(values) > 1 else value
    vm = dictionary_VM(keyword)
    if not _multiplicity_ok(vm, len(values)):
        raise DicomError(path, f"{_shown(whole)} holds {len(values)} values; its value multiplicity is {vm}",
                         tag=name)
    for v in values:
        if vr in _INTEGER_VRS:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif vr == "DS":
            ok = isinstance(v, float | int | Decimal) and not isinstance(v, bool) and math.isfinite(v)
        elif vr in ("FL", "FD"):
            ok = isinstance(v, float) and math.isfinite(v)
        else:
            ok = isinstance(v, str)
        if not ok:
            raise DicomError(path, f"{_shown(whole)} is not a valid {vr}", tag=name)
    if keyword == "BurnedInAnnotation" and str(value).strip() not in ("YES", "NO"):
        raise DicomError(path, f"{_shown(value)} is neither 'YES' nor 'NO'", tag=name)


def _check_header(path: Path, ds: pydicom.Dataset) -> None:
    """Parse every attribute of :data:`HEADER_KEYWORDS` under its VR; a value that does not parse is a DicomError."""
    for keyword in HEADER_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            continue
        raw = ds.get_item(tag)
        try:
            elem = ds[tag]
            vr, value = str(elem.VR), elem.value
        except _HEADER_ERRORS as exc:
            bad, vr = (raw.value, raw.VR) if raw is not None else (None, "its VR")
            reason = str(exc).split(". ")[0]
            raise DicomError(path, f"{_shown(bad)} is not a valid {vr} ({reason})", tag=tag_name(tag)) from exc
        _check_value(path, keyword, vr, value)


def read_dicom(path: Path) -> pydicom.Dataset:
    """Read a DICOM file whose header privrad can use: complete, and every attribute it reads valid under its VR.

    Raises
    ------
    DicomError
        Not DICOM, truncated, or a value of :data:`HEADER_KEYWORDS` that breaks its VR or
        value multiplicity (the message cites the tag, its name and the bad value).
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DicomError(path, f"is not a DICOM file ({exc})") from exc
    except (EOFError, OSError, *_HEADER_ERRORS) as exc:
        raise DicomError(path, f"is truncated or corrupt: cannot parse the header ({exc})") from exc
    _check_complete(path, ds)
    _check_header(path, ds)
    return ds


def read_dicom_hu(path: Path, *, modality: str | None = "CT") -> npt.NDArray[np.float64]:
    """Read one single-frame greyscale DICOM slice as modality values (HU for CT).

    Raises
    ------
    DicomError
        Not DICOM, truncated, a header value that breaks its VR, wrong modality, no pixel
        data, unsupported photometric interpretation or transfer syntax that cannot be
        decoded; the message names the tag.
    """
    path = Path(path)
    ds = read_dicom(path)

    if modality is not None:
        found = str(ds.get("Modality", "")).strip()
        if found != modality:
            raise DicomError(path, f"is {found or 'missing'!r}, expected {modality!r}",
                             tag="(0008,0060) Modality")
    if "PixelData" not in ds:
        raise DicomError(path, "is missing: the file holds no image", tag="(7FE0,0010) Pixel Data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONOCHROME:
        raise DicomError(
            path, f"{photometric or 'missing'!r} is not supported; expected one of {_MONOCHROME}",
            tag="(0028,0004) Photometric Interpretation",
        )
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError(path, "is above 1: one slice per file is expected",
                         tag="(0028,0008) Number of Frames")
    if ds.get("Modality") == "CT" and "RescaleIntercept" not in ds:
        raise DicomError(path, "is missing: CT pixel data cannot be mapped to HU",
                         tag="(0028,1052) Rescale Intercept")

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(path, f"{name} ({syntax}) cannot be decoded here: {exc}",
                         tag="(0002,0010) Transfer Syntax UID") from exc
    except (EOFError, OSError, *_HEADER_ERRORS) as exc:
        raise DicomError(path, f"is truncated or corrupt: {exc}", tag="(7FE0,0010) Pixel Data") from exc
    if arr.ndim != 2:
        raise DicomError(path, f"has shape {arr.shape}, expected one 2-D slice",
                         tag="(7FE0,0010) Pixel Data")
    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except _HEADER_ERRORS as exc:
        raise DicomError(path, f"cannot map the pixels to modality values ({exc})",
                         tag="(0028,3000) Modality LUT Sequence" if "ModalityLUTSequence" in ds
                         else "(0028,1053) Rescale Slope") from exc
    if not np.isfinite(values).all():
        raise DicomError(path, f"{_shown(ds.get('RescaleSlope'))} with Rescale Intercept "
                               f"{_shown(ds.get('RescaleIntercept'))} maps the pixels outside the floating-point range",
                         tag="(0028,1053) Rescale Slope")
    if photometric == "MONOCHROME1" and ds.get("Modality") != "CT":
        values = values.max() + values.min() - values  # display inversion for non-CT images
    return values


def _dicom_to_tensor(path: Path, pre: Preprocess) -> torch.Tensor:
    values = read_dicom_hu(path, modality=pre.modality)
    if pre.modality == "CT":
        img = apply_window(values, pre.window_center, pre.window_width)
    else:  # no physical unit: min-max to [0, 1]
        lo, hi = float(values.min()), float(values.max())
        img = ((values - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
    return _resize(img, pre.size)


def read_slice(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """One DICOM slice as the model sees it: ``(1, size, size)`` in [0, 1], windowed and resized as in training."""
    return _dicom_to_tensor(Path(path), preprocess)


# ----------------------------------------------------------------------------- labels


def _label_index(label: str, classes: Sequence[str], where: Path) -> int:
    key = label.strip().casefold()
    key = _LABEL_ALIASES.get(key, key)
    folded = [_LABEL_ALIASES.get(c.casefold(), c.casefold()) for c in classes]
    if key not in folded:
        raise LabelError(where, f"label {label!r} is not in the class list {tuple(classes)}")
    return folded.index(key)


class _Collector:
    """Gathers tensors, applying the error policy uniformly."""

    def __init__(self, policy: ErrorPolicy) -> None:
        self.policy = ErrorPolicy(policy)
        self.images: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.files: list[str] = []
        self.skipped: list[SkippedFile] = []

    def fail(self, err: DataError) -> None:
        if self.policy is ErrorPolicy.RAISE:
            raise err
        log.warning("skipped %s", err)
        self.skipped.append(SkippedFile(err.path or Path("."), err.problem))

    def finish(self, root: Path, classes: Sequence[str]) -> ImageSet:
        if not self.images:
            detail = f"; {len(self.skipped)} files skipped" if self.skipped else ""
            raise DataError(root, f"holds no usable images{detail}")
        if self.skipped:
            log.warning("%s: %d files skipped, %d loaded", root, len(self.skipped), len(self.images))
        return ImageSet(
            images=torch.stack(self.images),
            labels=torch.tensor(self.labels, dtype=torch.int64),
            classes=tuple(classes),
            files=tuple(self.files),
            skipped=tuple(self.skipped),
        )


# ----------------------------------------------------------------------------- layouts


def load_dicom_folder(
    folder: Path,
    *,
    classes: Sequence[str] = CLASSES,
    preprocess: Preprocess | None = None,
    on_error: ErrorPolicy | str = ErrorPolicy.RAISE,
) -> ImageSet:
    """Load ``folder/labels.csv`` (columns ``file,label``) and the DICOM files it names.

    DICOM files in the folder that ``labels.csv`` does not list are reported as skipped.
    """
    pre = preprocess or Preprocess()
    folder = Path(folder)
    table = folder / "labels.csv"
    if not folder.is_dir():
        raise DataError(folder, "is not a folder")
    if not table.is_file():
        raise DataError(table, "is missing: a DICOM folder needs labels.csv with columns file,label")
    with table.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise DataError(table, f"must have columns 'file,label', found {reader.fieldnames}")
        rows = [(r["file"], r["label"]) for r in reader]
    if not rows:
        raise DataError(table, "lists no files")

    out = _Collector(ErrorPolicy(on_error))
    listed = set()
    for name, label in rows:
        path = folder / name
        listed.add(path.name)
        try:
            index = _label_index(label, classes, path)
            if not path.is_file():
                raise DataError(path, "is listed in labels.csv but does not exist")
            out.images.append(_dicom_to_tensor(path, pre))
        except DataError as err:
            out.fail(err)
            continue
        out.labels.append(index)
        out.files.append(name)
    for extra in sorted(folder.glob("*.dcm")):
        if extra.name not in listed:
            out.fail(DataError(extra, "is not listed in labels.csv"))
    return out.finish(folder, classes)


def load_image_tree(
    root: Path,
    *,
    classes: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    on_error: ErrorPolicy | str = ErrorPolicy.RAISE,
) -> ImageSet:
    """Load a folder-per-class tree of PNG/JPG images (``root/<class>/*.png``).

    Without ``classes`` the sorted sub-folder names are the classes; with them, every
    sub-folder must name one of them (case-insensitive; ``Tumor`` matches ``tumour``).
    """
    pre = preprocess or Preprocess()
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subdirs:
        raise DataError(root, "has no class sub-folders (expected root/<class>/*.png)")
    names = tuple(classes) if classes is not None else tuple(p.name for p in subdirs)
    out = _Collector(ErrorPolicy(on_error))
    for sub in subdirs:
        try:
            index = _label_index(sub.name, names, sub)
        except LabelError as err:
            out.fail(err)
            continue
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                out.fail(DataError(path, f"has suffix {path.suffix!r}; expected one of "
                                         f"{sorted(IMAGE_SUFFIXES)}"))
                continue
            try:
                with Image.open(path) as im:
                    grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                out.fail(DataError(path, f"is not a readable image ({exc})"))
                continue
            out.images.append(_resize(grey, pre.size))
            out.labels.append(index)
            out.files.append(f"{sub.name}/{path.name}")
    return out.finish(root, names)


def load_npz(
    path: Path,
    *,
    split: str = "train",
    classes: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
) -> ImageSet:
    """Load a MedMNIST-style archive: ``{split}_images`` (N,H,W[,C]) and ``{split}_labels``."""
    pre = preprocess or Preprocess()
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"is not a readable .npz archive ({exc})") from exc
    with archive:
        keys = set(archive.files)
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in keys or lk not in keys:
            raise DataError(path, f"has no {ik!r}/{lk!r} arrays; found {sorted(keys)}")
        images, labels = archive[ik], archive[lk].reshape(-1)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(path, f"{ik} has shape {images.shape}, {lk} has {labels.shape}: "
                              "expected (N,H,W[,C]) and N labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(path, f"{lk} must be integers, got {labels.dtype}")
    names = tuple(classes) if classes is not None else tuple(
        f"class-{k}" for k in range(int(labels.max()) + 1))
    bad = labels[(labels < 0) | (labels >= len(names))]
    if bad.size:
        raise LabelError(path, f"label {int(bad[0])} is not in the class list {names}")
    scale = 255.0 if images.dtype == np.uint8 else max(float(images.max()), 1.0)
    tensors = [_resize(img.astype(np.float32) / scale, pre.size) for img in images]
    return ImageSet(
        images=torch.stack(tensors),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=names,
        files=tuple(f"{path.name}[{split}][{i}]" for i in range(len(tensors))),
    )


def load_dataset(
    path: Path,
    *,
    classes: Sequence[str] | None = CLASSES,
    preprocess: Preprocess | None = None,
    on_error: ErrorPolicy | str = ErrorPolicy.RAISE,
    split: str = "train",
) -> ImageSet:
    """Load any supported layout, chosen by what ``path`` is.

    * a ``.npz`` file: MedMNIST-style archive (``split`` picks the arrays);
    * a folder with ``labels.csv``: DICOM slices;
    * a folder of class sub-folders: PNG/JPG tree.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path, split=split, classes=classes, preprocess=preprocess)
    if not path.exists():
        raise DataError(path, "does not exist")
    if (path / "labels.csv").is_file():
        return load_dicom_folder(path, classes=classes or CLASSES, preprocess=preprocess,
                                 on_error=on_error)
    if path.is_dir():
        return load_image_tree(path, classes=classes, preprocess=preprocess, on_error=on_error)
    raise DataError(path, "is neither a .npz archive nor a folder")


def concat(sets: Iterable[ImageSet]) -> ImageSet:
    """Pool several image sets with the same classes (centralised training)."""
    sets = list(sets)
    if not sets:
        raise DataError(None, "nothing to pool: no image sets given")
    classes = sets[0].classes
    for s in sets[1:]:
        if s.classes != classes:
            raise DataError(None, f"cannot pool class lists {classes} and {s.classes}")
    return ImageSet(
        images=torch.cat([s.images for s in sets]),
        labels=torch.cat([s.labels for s in sets]),
        classes=classes,
        files=tuple(f for s in sets for f in s.files),
        skipped=tuple(k for s in sets for k in s.skipped),
    )


SITE_PREFIX = "site-"
"""A federation data folder holds one ``site-K`` folder per hospital, K = 1, 2, …"""


def site_name(k: int) -> str:
    """The folder (and site) name of the ``k``-th hospital, counted from 1."""
    if k < 1:
        raise ConfigError(f"sites are counted from 1, got {k}")
    return f"{SITE_PREFIX}{k}"


def site_folders(data: Path) -> list[Path]:
    """The ``site-K`` folders of a federation data folder, in site order."""
    def order(p: Path) -> int:
        tail = p.name.removeprefix(SITE_PREFIX)
        return int(tail) if tail.isdigit() else 0

    return sorted((p for p in Path(data).glob(f"{SITE_PREFIX}*") if p.is_dir()), key=order)
