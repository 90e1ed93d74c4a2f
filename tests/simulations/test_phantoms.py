from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from federation.errors import ConfigError
from federation.ingest import read_dicom_hu
from federation.model import CLASSES
from simulations.phantoms import (
    PhantomConfig,
    generate_phantoms,
    public_profile,
    site_profiles,
    write_ct_dicom,
)

from ..conftest import TINY


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_writes_byte_identical_files(tiny_federation: Path, tmp_path: Path) -> None:
    generate_phantoms(tmp_path, config=TINY)

    assert _digest_tree(tmp_path) == _digest_tree(tiny_federation)


def test_another_seed_writes_different_images(tiny_federation: Path, tmp_path: Path) -> None:
    generate_phantoms(tmp_path, config=PhantomConfig(sites=2, per_site=12, test=9, size=32, seed=4))

    a = pydicom.dcmread(tiny_federation / "site-1" / "site-1_00000.dcm").pixel_array
    b = pydicom.dcmread(tmp_path / "site-1" / "site-1_00000.dcm").pixel_array
    assert not np.array_equal(a, b)


def test_layout_has_sites_test_and_labels(tiny_federation: Path) -> None:
    for folder in ("site-1", "site-2", "test"):
        rows = list(csv.DictReader((tiny_federation / folder / "labels.csv").open()))
        assert len(rows) == (TINY.test if folder == "test" else TINY.per_site)
        assert {r["label"] for r in rows} <= set(CLASSES)
        assert all((tiny_federation / folder / r["file"]).is_file() for r in rows)


def test_files_are_real_ct_dicom_with_unique_uids(tiny_federation: Path) -> None:
    files = sorted(tiny_federation.rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]

    assert all(ds.Modality == "CT" for ds in datasets)
    assert all(ds.SOPClassUID == pydicom.uid.CTImageStorage for ds in datasets)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(files)
    assert all(float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0 for ds in datasets)
    assert all(ds.Rows == ds.Columns == TINY.size for ds in datasets)
    assert all(float(ds.PixelSpacing[0]) > 0 for ds in datasets)


def test_written_hu_values_read_back_exactly(tmp_path: Path) -> None:
    # Prepare: golden HU values at integer positions, covering air, fat, water, soft tissue, bone
    hu = np.array([[-1000.0, -100.0, 0.0, 40.0], [150.0, 700.0, 1200.0, -1024.0],
                   [3071.0, 1.0, -1.0, 255.0], [20.0, 30.0, 60.0, 90.0]])
    path = tmp_path / "golden.dcm"

    # Execute
    write_ct_dicom(path, hu, patient_id="golden", uid_entropy=["golden"])
    back = read_dicom_hu(path)
    raw = pydicom.dcmread(path).pixel_array

    # Assert: stored value = HU + 1024, and the modality LUT gives the HU back
    assert raw.dtype == np.uint16
    assert raw[0, 0] == 24
    assert raw[0, 2] == 1024
    assert raw[1, 1] == 1724
    np.testing.assert_array_equal(back, hu)


def test_sites_differ_in_mix_noise_offset_and_blur() -> None:
    profiles = site_profiles(PhantomConfig(sites=5))

    assert len({p.class_mix for p in profiles}) == 5
    assert np.ptp([p.noise_hu for p in profiles]) > 3.0
    assert np.ptp([p.offset_hu for p in profiles]) > 5.0
    assert all(min(p.class_mix) > 0.1 for p in profiles)


@pytest.mark.parametrize(("field", "value"), [("sites", 0), ("per_site", 0), ("size", 8),
                                              ("difficulty", 0.0), ("test", -1),
                                              ("public", -1), ("site_sizes", (10, 10)),
                                              ("site_sizes", (10, 0, 10, 10, 10)), ("public_shift", -0.5)])
def test_bad_config_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`"):
        PhantomConfig(**{field: value})


def test_the_public_archive_is_a_further_scanner_with_images_no_site_has(tmp_path: Path) -> None:
    # Prepare: the tiny federation again, now with a public archive
    config = PhantomConfig(sites=2, per_site=12, test=9, size=32, seed=3, public=10)

    # Execute
    generate_phantoms(tmp_path, config=config)

    # Assert: the sites and test set are unchanged by adding the archive ...
    without = tmp_path / "without"
    generate_phantoms(without, config=TINY)
    with_public = _digest_tree(tmp_path)
    assert {k: v for k, v in with_public.items() if not k.startswith(("public", "without", "sites.json"))} == {
        k: v for k, v in _digest_tree(without).items() if k != "sites.json"}
    # ... its labels are complete, its scanner is none of the sites', and no image repeats a site's
    rows = list(csv.DictReader((tmp_path / "public" / "labels.csv").open()))
    assert len(rows) == 10
    profile = public_profile(config)
    assert profile.name == "public"
    assert all(profile.noise_hu != p.noise_hu for p in site_profiles(config))
    private = {hashlib.sha256(read_dicom_hu(f).tobytes()).hexdigest()
               for f in tmp_path.glob("site-*/*.dcm")}
    public = {hashlib.sha256(read_dicom_hu(f).tobytes()).hexdigest() for f in (tmp_path / "public").glob("*.dcm")}
    assert len(public) == 10
    assert not public & private


def test_sites_of_unequal_size_write_their_own_counts_and_the_rest_is_unchanged(tmp_path: Path) -> None:
    sizes = (7, 3, 1)
    config = PhantomConfig(sites=3, site_sizes=sizes, test=4, size=16, seed=5)

    generate_phantoms(tmp_path, config=config)

    counts = tuple(len(list(csv.DictReader((tmp_path / f"site-{k + 1}" / "labels.csv").open()))) for k in range(3))
    assert counts == sizes
    assert config.training_slices == 11
    assert len(list((tmp_path / "test").glob("*.dcm"))) == 4


def test_a_shifted_public_archive_is_noisier_blurrier_and_offset_and_its_images_are_harder(tmp_path: Path) -> None:
    base, shifted = (public_profile(PhantomConfig(public=8, public_shift=s)) for s in (0.0, 1.0))
    generate_phantoms(tmp_path / "a", config=PhantomConfig(sites=1, per_site=1, test=0, size=32, public=8))
    generate_phantoms(tmp_path / "b", config=PhantomConfig(sites=1, per_site=1, test=0, size=32, public=8,
                                                           public_shift=1.0))

    assert shifted.noise_hu == pytest.approx(2 * base.noise_hu)
    assert shifted.blur_px == pytest.approx(base.blur_px + 1.5)
    assert shifted.offset_hu == pytest.approx(base.offset_hu + 40.0)
    assert shifted.class_mix == base.class_mix
    assert "shifted" in shifted.manufacturer
    # the same slices (labels, geometry) under another scanner: the HU differ
    a = [read_dicom_hu(f) for f in sorted((tmp_path / "a" / "public").glob("*.dcm"))]
    b = [read_dicom_hu(f) for f in sorted((tmp_path / "b" / "public").glob("*.dcm"))]
    assert len(a) == len(b) == 8
    assert np.mean([np.abs(x - y).mean() for x, y in zip(a, b, strict=True)]) > 10.0
    # the sites are untouched by the archive's shift
    assert _digest_tree(tmp_path / "a" / "site-1") == _digest_tree(tmp_path / "b" / "site-1")
