"""Synthetic hospitals: kidney-CT-like axial slices written as real CT DICOM files.

No patient data can be used here, so each simulated hospital gets phantoms drawn from
a simple anatomical model (body, fat, spine, two contrast-enhanced kidneys, fluid-filled
bowel loops that mimic cysts) with one of three findings:

* ``normal``: no renal lesion;
* ``cyst``: round, homogeneous, water-like (0-20 HU), sharp rim;
* ``tumour``: irregular, heterogeneous, enhancing (60-130 HU), sometimes necrotic.

Sites differ in class mix, noise level, intensity offset (scanner calibration) and blur,
so the federation is non-IID. Everything is a pure function of the seed: the same call
writes byte-identical files.

The rendering is done in Hounsfield units at twice the output resolution and then
area-averaged, which mimics the partial-volume effect of a real scanner.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from federation.errors import ConfigError
from federation.ingest import site_name
from federation.model import CLASSES

__all__ = [
    "PhantomConfig",
    "SiteProfile",
    "generate_phantoms",
    "public_profile",
    "render_slice",
    "site_profiles",
    "write_ct_dicom",
]

FloatArray = npt.NDArray[np.float64]

RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
# The view is centred on the kidneys: it spans [-0.6, 0.6] of a body whose half-width is ~0.85.
VIEW_HALF_WIDTH = 0.6
VIEW_CENTER_Y = 0.2
FIELD_OF_VIEW_MM = 420.0 * VIEW_HALF_WIDTH
_STUDY_DATE = "20260101"
# `render_slice`'s raw difficulty for PhantomConfig.difficulty = 1 (calibrated on Ref-CNN AUC).
DIFFICULTY_SCALE = 0.35


@dataclass(frozen=True)
class PhantomConfig:
    """How many phantoms to make and how hard they are.

    Parameters
    ----------
    sites
        Number of simulated hospitals.
    per_site
        Training slices written per site.
    test
        Slices in the held-out ``test/`` set (balanced classes, all scanners): for reporting only.
    val
        Slices in the ``val/`` set, drawn like ``test/`` on a stream of its own: every choice
        (architecture, learning rate, ...) is made on it, never on ``test/``; 0 writes none.
    size
        Output matrix size in pixels (square).
    seed
        Seed of everything; the same seed gives byte-identical files.
    public
        Slices in ``public/``: a labelled *public archive* from one further scanner, drawn
        apart from every site's data (its own random stream and scanner profile), the
        stand-in for a public data set such as KiTS19. The server may pretrain on it
        (no privacy cost); 0 writes none.
    site_sizes
        Training slices per site, one entry per site (sites of unequal size, e.g.
        ``(4000, 3000, 2400, 1800, 800)``); empty (the default) gives every site ``per_site``.
    public_shift
        How far the public archive's scanner lies from the hospitals' (0 = drawn like a
        site's): at ``s`` its noise is ``1 + s`` times, its blur (a softer reconstruction kernel,
        a coarser resolution) ``1.5 s`` pixels more and its intensity offset (another contrast
        phase) ``40 s`` HU higher than its drawn profile.
    difficulty
        1.0 is the default task (at 64x64 a centralised Ref-CNN reaches a validation
        macro-AUC of 0.997 with the flatten head and the Approx-CNN 0.986, 30 epochs: near
        the ceiling); larger values make lesions smaller, less textured and the images
        noisier, smaller values make the task easier.
    """

    sites: int = 5
    per_site: int = 300
    test: int = 300
    size: int = 64
    seed: int = 0
    difficulty: float = 1.0
    public: int = 0
    val: int = 0
    site_sizes: tuple[int, ...] = ()
    public_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"`sites` must be at least 1, got {self.sites}")
        if self.per_site < 1:
            raise ConfigError(f"`per_site` must be at least 1, got {self.per_site}")
        if self.test < 0:
            raise ConfigError(f"`test` must not be negative, got {self.test}")
        if self.public < 0:
            raise ConfigError(f"`public` must not be negative, got {self.public}")
        if self.val < 0:
            raise ConfigError(f"`val` must not be negative, got {self.val}")
        if not 16 <= self.size <= 1024:
            raise ConfigError(f"`size` must be between 16 and 1024 pixels, got {self.size}")
        if not 0.0 < self.difficulty <= 4.0:
            raise ConfigError(f"`difficulty` must be in (0, 4], got {self.difficulty}")
        if self.site_sizes and len(self.site_sizes) != self.sites:
            raise ConfigError(f"`site_sizes` must give one size per site ({self.sites}), got {len(self.site_sizes)}")
        if any(n < 1 for n in self.site_sizes):
            raise ConfigError(f"`site_sizes` must all be at least 1, got {self.site_sizes}")
        if not 0.0 <= self.public_shift <= 4.0:
            raise ConfigError(f"`public_shift` must be in [0, 4], got {self.public_shift}")

    def site_size(self, k: int) -> int:
        """Training slices of site ``k`` (0-based)."""
        return self.site_sizes[k] if self.site_sizes else self.per_site

    @property
    def training_slices(self) -> int:
        """Training slices over all sites."""
        return sum(self.site_size(k) for k in range(self.sites))


@dataclass(frozen=True)
class SiteProfile:
    """What makes one hospital's images differ from another's."""

    name: str
    class_mix: tuple[float, float, float]
    noise_hu: float
    offset_hu: float
    blur_px: float
    manufacturer: str


_MANUFACTURERS = ("PhantomScan A", "PhantomScan B", "PhantomScan C", "PhantomScan D")


def site_profiles(config: PhantomConfig) -> list[SiteProfile]:
    """Draw the per-site scanner and population profiles (deterministic in the seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xC0FFEE]))
    profiles = []
    for k in range(config.sites):
        skew = rng.dirichlet(np.full(len(CLASSES), 1.5))
        mix = 0.4 / len(CLASSES) + 0.6 * skew  # every class present at every site
        profiles.append(
            SiteProfile(
                name=site_name(k + 1),
                class_mix=(float(mix[0]), float(mix[1]), float(mix[2])),
                noise_hu=float(rng.uniform(12.0, 28.0)),
                offset_hu=float(rng.uniform(-20.0, 20.0)),
                blur_px=float(rng.uniform(0.0, 1.0)),
                manufacturer=_MANUFACTURERS[k % len(_MANUFACTURERS)],
            )
        )
    return profiles


def public_profile(config: PhantomConfig) -> SiteProfile:
    """The scanner and population profile of the public archive (its own random stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x9AB11C]))
    skew = rng.dirichlet(np.full(len(CLASSES), 1.5))
    mix = 0.4 / len(CLASSES) + 0.6 * skew
    shift = config.public_shift
    return SiteProfile(name="public", class_mix=(float(mix[0]), float(mix[1]), float(mix[2])),
                       noise_hu=float(rng.uniform(12.0, 28.0)) * (1.0 + shift),
                       offset_hu=float(rng.uniform(-20.0, 20.0)) + 40.0 * shift,
                       blur_px=float(rng.uniform(0.0, 1.0)) + 1.5 * shift,
                       manufacturer="Public Archive Scanner" + (f" (shifted {shift:g})" if shift else ""))


# ----------------------------------------------------------------------------- rendering


def _ellipse(
    x: FloatArray, y: FloatArray, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0
) -> npt.NDArray[np.bool_]:
    c, s = np.cos(angle), np.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0  # type: ignore[no-any-return]


def _blob(
    x: FloatArray, y: FloatArray, cx: float, cy: float, r: float, rng: np.random.Generator,
    irregularity: float,
) -> npt.NDArray[np.bool_]:
    """A star-shaped blob whose radius is modulated by low-frequency harmonics."""
    theta = np.arctan2(y - cy, x - cx)
    radius = np.full_like(theta, r)
    for k in range(2, 6):
        radius += r * irregularity * rng.uniform(0.3, 1.0) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    inside: npt.NDArray[np.bool_] = np.hypot(x - cx, y - cy) <= radius
    return inside


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> FloatArray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)  # type: ignore[no-any-return]


def render_slice(
    label: str, profile: SiteProfile, size: int, difficulty: float, rng: np.random.Generator
) -> FloatArray:
    """Render one axial slice in Hounsfield units.

    Parameters
    ----------
    label
        One of :data:`federation.model.CLASSES`.
    profile
        The scanner profile (noise, offset, blur).
    size
        Output matrix size in pixels.
    difficulty
        See :class:`PhantomConfig`.
    rng
        The random generator of this slice.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array of HU values.
    """
    if label not in CLASSES:
        raise ConfigError(f"`label` must be one of {CLASSES}, got {label!r}")
    hi = 2 * size  # supersampled grid
    coords = ((np.arange(hi) + 0.5) / hi * 2.0 - 1.0) * VIEW_HALF_WIDTH
    x, y = np.meshgrid(coords, coords + VIEW_CENTER_Y)
    img = np.full((hi, hi), -1000.0)

    # body: subcutaneous fat around soft tissue
    bx, by = rng.uniform(0.78, 0.9), rng.uniform(0.58, 0.68)
    img[_ellipse(x, y, 0.0, 0.05, bx, by)] = -100.0
    img[_ellipse(x, y, 0.0, 0.05, bx - 0.07, by - 0.07)] = 45.0
    # retroperitoneal and mesenteric fat islands
    for _ in range(rng.integers(3, 7)):
        img[_ellipse(x, y, rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(0.04, 0.12),
                     rng.uniform(0.03, 0.08), rng.uniform(0, np.pi))] = -90.0
    # liver edge on the patient's right
    img[_ellipse(x, y, -0.45, -0.25, 0.35, 0.25, 0.3) & _ellipse(x, y, 0.0, 0.05, bx - 0.07, by - 0.07)] = 60.0
    # spine: cortical ring and cancellous core
    img[_ellipse(x, y, 0.0, 0.42, 0.13, 0.12)] = 700.0
    img[_ellipse(x, y, 0.0, 0.42, 0.10, 0.09)] = 250.0
    # bowel loops: gas, and fluid-filled ones that look like cysts
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(-0.35, 0.35), rng.uniform(-0.45, 0.05)
        r = rng.uniform(0.03, 0.08)
        img[_ellipse(x, y, cx, cy, r, r)] = rng.choice([-900.0, rng.uniform(0.0, 25.0)])

    # kidneys: enhancing cortex, medulla, sinus fat
    kidneys = []
    for side in (-1.0, 1.0):
        kx = side * rng.uniform(0.33, 0.42)
        ky = rng.uniform(0.17, 0.27)
        krx, kry = rng.uniform(0.14, 0.18), rng.uniform(0.19, 0.24)
        ang = side * rng.uniform(0.2, 0.5)
        cortex = rng.uniform(140.0, 180.0)
        img[_ellipse(x, y, kx, ky, krx, kry, ang)] = cortex
        img[_ellipse(x, y, kx + side * 0.02, ky, krx * 0.55, kry * 0.6, ang)] = rng.uniform(60.0, 90.0)
        img[_ellipse(x, y, kx + side * 0.06, ky, krx * 0.25, kry * 0.3, ang)] = -60.0
        kidneys.append((kx, ky, krx, kry, ang, cortex))

    # the finding
    if label != "normal":
        kx, ky, krx, kry, ang, cortex = kidneys[rng.integers(0, 2)]
        # lesion centre anywhere in the kidney, exophytic ones included
        t, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.0, 1.0)) * 0.8
        u, v = rr * krx * np.cos(t), rr * kry * np.sin(t)
        cx = kx + u * np.cos(ang) - v * np.sin(ang)
        cy = ky + u * np.sin(ang) + v * np.cos(ang)
        r = rng.uniform(0.035, 0.10) / np.sqrt(difficulty)
        if label == "cyst":
            mask = _ellipse(x, y, cx, cy, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi))
            img[mask] = rng.uniform(0.0, 20.0)
        else:
            mask = _blob(x, y, cx, cy, r, rng, irregularity=rng.uniform(0.3, 0.8))
            texture = _smooth_field((hi, hi), sigma=hi / 64, rng=rng)
            mean = rng.uniform(60.0, 130.0)
            tumour = mean + texture * rng.uniform(15.0, 35.0) / difficulty
            if rng.uniform() < 0.3:  # necrotic centre
                tumour[_ellipse(x, y, cx, cy, r * 0.4, r * 0.4)] = rng.uniform(10.0, 30.0)
            img[mask] = tumour[mask]

    # scanner: partial volume (area average), blur, calibration offset, correlated noise
    img = img.reshape(size, 2, size, 2).mean(axis=(1, 3))
    if profile.blur_px > 0:
        img = ndimage.gaussian_filter(img, profile.blur_px)
    noise = 0.6 * rng.standard_normal((size, size)) + 0.8 * _smooth_field((size, size), 0.7, rng)
    img = img + profile.offset_hu + noise * profile.noise_hu * difficulty
    return img  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- DICOM


def write_ct_dicom(
    path: Path,
    hu: FloatArray,
    *,
    patient_id: str,
    uid_entropy: list[str],
    manufacturer: str = "privrad phantom",
    series_description: str = "",
) -> None:
    """Write a HU image as a CT Image Storage DICOM file.

    Stored values are ``round(HU - RescaleIntercept)``, clipped to the 12-bit range,
    with RescaleSlope 1 and RescaleIntercept -1024, as most CT scanners write them.
    UIDs are derived from ``uid_entropy`` so that the output is deterministic.
    """
    rows, cols = hu.shape
    stored = np.clip(np.rint((hu - RESCALE_INTERCEPT) / RESCALE_SLOPE), 0, 4095).astype(np.uint16)

    sop_uid = generate_uid(entropy_srcs=[*uid_entropy, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_entropy, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*uid_entropy, "for"])
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.SeriesDescription = series_description or "synthetic kidney phantom"
    ds.PatientName = f"Phantom^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom: no patient"  # 1C: required with PatientIdentityRemoved YES
    # Type 2 (present, may be empty) in the CT IOD; dciodvfy reports them missing otherwise
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "FFS"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.BurnedInAnnotation = "NO"  # drawn, not scanned: no text in the pixels (the vault refuses DERIVED without it)
    ds.InstanceNumber = 1
    ds.SliceThickness = "5.0"
    ds.KVP = "120"
    ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [FIELD_OF_VIEW_MM / rows, FIELD_OF_VIEW_MM / cols]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = f"{RESCALE_SLOPE:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


# ----------------------------------------------------------------------------- generator


def _draw_labels(n: int, mix: tuple[float, ...], rng: np.random.Generator) -> list[str]:
    counts = np.floor(np.asarray(mix) * n).astype(int)
    counts[np.argmax(mix)] += n - counts.sum()
    labels = [c for c, k in zip(CLASSES, counts, strict=True) for _ in range(k)]
    return [labels[i] for i in rng.permutation(n)]


def _write_set(
    folder: Path,
    labels: list[str],
    profile_of: Callable[[int], SiteProfile],
    config: PhantomConfig,
    stream: int,
    progress: Callable[[int], None] | None,
) -> None:
    rows = []
    for i, label in enumerate(labels):
        profile = profile_of(i)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, stream, i]))
        hu = render_slice(label, profile, config.size, DIFFICULTY_SCALE * config.difficulty, rng)
        name = f"{folder.name}_{i:05d}.dcm"
        write_ct_dicom(
            folder / name,
            hu,
            patient_id=f"{folder.name}-{i:05d}",
            uid_entropy=[str(config.seed), folder.name, str(i)],
            manufacturer=profile.manufacturer,
        )
        rows.append((name, label))
        if progress is not None:
            progress(1)
    tmp = folder / "labels.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    tmp.replace(folder / "labels.csv")


def _constant(profile: SiteProfile) -> Callable[[int], SiteProfile]:
    return lambda _i: profile


def generate_phantoms(
    out: Path, *, config: PhantomConfig, progress: Callable[[int], None] | None = None
) -> list[SiteProfile]:
    """Write ``out/site-K/`` (K = 1..sites), ``out/test/``, ``out/val/`` and ``out/public/``, each with ``labels.csv``.

    Parameters
    ----------
    out
        Destination folder (created).
    config
        Sizes, seed and difficulty.
    progress
        Called with the number of slices written since the last call.

    Returns
    -------
    list of SiteProfile
        The profiles used, also written to ``out/sites.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    profiles = site_profiles(config)
    for k, profile in enumerate(profiles):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1, k]))
        labels = _draw_labels(config.site_size(k), profile.class_mix, rng)
        _write_set(out / profile.name, labels, _constant(profile), config, 100 + k, progress)
    if config.test > 0:
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
        labels = _draw_labels(config.test, (1 / 3, 1 / 3, 1 / 3), rng)
        scanners = rng.integers(0, len(profiles), size=config.test)
        _write_set(out / "test", labels, lambda i: profiles[int(scanners[i])], config, 99, progress)
    if config.val > 0:
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 4]))
        labels = _draw_labels(config.val, (1 / 3, 1 / 3, 1 / 3), rng)
        scanners = rng.integers(0, len(profiles), size=config.val)
        _write_set(out / "val", labels, lambda i: profiles[int(scanners[i])], config, 97, progress)
    public = public_profile(config)
    if config.public > 0:
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3]))
        labels = _draw_labels(config.public, public.class_mix, rng)
        _write_set(out / "public", labels, _constant(public), config, 98, progress)
    manifest = {
        "config": dataclasses.asdict(config),
        "classes": list(CLASSES),
        "sites": [dataclasses.asdict(p) for p in profiles],
        "public": dataclasses.asdict(public) if config.public > 0 else None,
        "generated_by": "privrad phantoms",
    }
    tmp = out / "sites.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "sites.json")
    return profiles
