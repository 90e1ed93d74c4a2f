from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import JPEGLSLossless, RLELossless

from federation.errors import DataError, DicomError, LabelError
from federation.ingest import (
    ErrorPolicy,
    Preprocess,
    apply_window,
    load_dataset,
    load_dicom_folder,
    load_image_tree,
    load_npz,
    read_dicom_hu,
)
from federation.model import CLASSES

from ..conftest import TINY


@pytest.fixture
def site(tiny_federation: Path, tmp_path: Path) -> Path:
    """A private copy of site-1 that a test may damage."""
    return Path(shutil.copytree(tiny_federation / "site-1", tmp_path / "site-1"))


def _first(site: Path) -> Path:
    return site / "site-1_00000.dcm"


def test_a_dicom_site_loads_with_labels_in_class_order(site: Path) -> None:
    data = load_dicom_folder(site, preprocess=Preprocess(size=32))

    assert data.images.shape == (TINY.per_site, 1, 32, 32)
    assert data.classes == CLASSES
    assert float(data.images.min()) >= 0.0
    assert float(data.images.max()) <= 1.0
    assert data.skipped == ()


def test_the_abdomen_window_maps_l40_w400_to_unit_range() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])

    np.testing.assert_allclose(apply_window(hu, 40.0, 400.0), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_a_text_file_is_not_dicom(site: Path) -> None:
    _first(site).write_text("hello, I am not an image")

    with pytest.raises(DicomError, match=r"site-1_00000\.dcm: is not a DICOM file"):
        read_dicom_hu(_first(site))


def test_a_truncated_file_is_reported_as_truncated(site: Path) -> None:
    data = _first(site).read_bytes()
    _first(site).write_bytes(data[: len(data) - 700])

    with pytest.raises(DicomError, match=r"\(7FE0,0010\) Pixel Data .*truncated"):
        read_dicom_hu(_first(site))


def test_a_file_cut_inside_the_header_is_reported(site: Path) -> None:
    _first(site).write_bytes(_first(site).read_bytes()[:300])

    with pytest.raises(DicomError, match="truncated or corrupt"):
        read_dicom_hu(_first(site))


def test_missing_pixel_data_names_the_tag(site: Path) -> None:
    ds = pydicom.dcmread(_first(site))
    del ds.PixelData
    ds.save_as(_first(site))

    with pytest.raises(DicomError, match=r"\(7FE0,0010\) Pixel Data is missing"):
        read_dicom_hu(_first(site))


def test_colour_photometric_interpretation_is_refused(site: Path) -> None:
    ds = pydicom.dcmread(_first(site))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(_first(site))

    with pytest.raises(DicomError, match=r"\(0028,0004\) Photometric Interpretation 'PALETTE COLOR'"):
        read_dicom_hu(_first(site))


def test_wrong_modality_names_the_tag(site: Path) -> None:
    ds = pydicom.dcmread(_first(site))
    ds.Modality = "MR"
    ds.save_as(_first(site))

    with pytest.raises(DicomError, match=r"\(0008,0060\) Modality is 'MR', expected 'CT'"):
        read_dicom_hu(_first(site))


def test_an_undecodable_compressed_transfer_syntax_names_the_syntax(site: Path) -> None:
    # JPEG-LS has no decoder installed here; the encapsulated bytes are never reached
    ds = pydicom.dcmread(_first(site))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a real codestream\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(_first(site), enforce_file_format=True)

    with pytest.raises(DicomError, match=r"\(0002,0010\) Transfer Syntax UID JPEG-LS Lossless"):
        read_dicom_hu(_first(site))


def test_rle_compressed_ct_decodes_to_the_same_hu(site: Path) -> None:
    before = read_dicom_hu(_first(site))
    ds = pydicom.dcmread(_first(site))
    ds.compress(RLELossless)
    ds.save_as(_first(site))

    assert pydicom.dcmread(_first(site)).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_dicom_hu(_first(site)), before)


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_dataset(tmp_path)


def test_labels_csv_listing_nothing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,label\n")

    with pytest.raises(DataError, match="lists no files"):
        load_dataset(tmp_path)


def test_a_label_outside_the_class_list_names_file_and_label(site: Path) -> None:
    table = site / "labels.csv"
    lines = table.read_text().splitlines()
    name = lines[1].split(",")[0]
    lines[1] = f"{name},stone"
    table.write_text("\n".join(lines) + "\n")

    with pytest.raises(LabelError, match=f"{name}: label 'stone' is not in the class list"):
        load_dicom_folder(site)


def test_skip_policy_reports_every_bad_file_and_keeps_the_rest(site: Path) -> None:
    _first(site).write_text("garbage")
    (site / "stray.dcm").write_bytes(b"")

    data = load_dicom_folder(site, preprocess=Preprocess(size=32), on_error=ErrorPolicy.SKIP)

    assert len(data) == TINY.per_site - 1
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert set(reasons) == {"site-1_00000.dcm", "stray.dcm"}
    assert "not a DICOM file" in reasons["site-1_00000.dcm"]
    assert "not listed in labels.csv" in reasons["stray.dcm"]


def test_a_png_class_tree_loads_with_folder_names_as_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("Cyst", 2), ("Normal", 3), ("Tumor", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).convert("RGB").save(tmp_path / "Normal" / "x.jpg")

    free = load_image_tree(tmp_path, preprocess=Preprocess(size=16))
    mapped = load_image_tree(tmp_path, classes=CLASSES, preprocess=Preprocess(size=16))

    assert free.classes == ("Cyst", "Normal", "Tumor")
    assert free.class_counts() == {"Cyst": 2, "Normal": 4, "Tumor": 1}
    assert mapped.class_counts() == {"normal": 4, "cyst": 2, "tumour": 1}
    assert mapped.images.shape == (7, 1, 16, 16)
    white = mapped.files.index("Normal/x.jpg")
    assert float(mapped.images[white].min()) == pytest.approx(1.0)


def test_a_png_tree_with_an_unknown_class_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stone").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "stone" / "a.png")

    with pytest.raises(LabelError, match="label 'stone' is not in the class list"):
        load_image_tree(tmp_path, classes=CLASSES)


def test_a_broken_png_is_named(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    with pytest.raises(DataError, match=r"bad\.png: is not a readable image"):
        load_image_tree(tmp_path, classes=CLASSES)


def test_a_medmnist_npz_loads_each_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "organamnist.npz"
    np.savez(path, train_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [2], [1], [0]]),
             test_images=rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8),
             test_labels=np.array([[2], [2]]))

    train = load_npz(path, classes=CLASSES, preprocess=Preprocess(size=32))
    test = load_dataset(path, split="test", preprocess=Preprocess(size=32))

    assert train.images.shape == (5, 1, 32, 32)
    assert train.labels.tolist() == [0, 1, 2, 1, 0]
    assert test.labels.tolist() == [2, 2]
    assert test.images.shape == (2, 1, 32, 32)


def test_an_npz_label_out_of_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([0, 7]))

    with pytest.raises(LabelError, match="label 7 is not in the class list"):
        load_npz(path, classes=CLASSES)


def test_an_npz_without_the_split_lists_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8))

    with pytest.raises(DataError, match=r"no 'train_images'/'train_labels' arrays; found \['images'\]"):
        load_npz(path)


def _with_raw(src: Path, dst: Path, keyword: str, vr: str, value: bytes) -> Path:
    """A real DICOM file whose ``keyword`` holds ``value`` as written, under ``vr`` (no validation on the way)."""
    ds = pydicom.dcmread(src)
    if len(value) % 2 and vr not in _BINARY_VRS:
        value += b" "
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD"})


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each invalid value it reads
@pytest.mark.parametrize(("keyword", "vr", "value", "message"), [
    ("InstanceNumber", "IS", b"1A", r"\(0020,0013\) Instance Number '1A' is not a valid IS"),
    ("Rows", "IS", b"1A", r"\(0028,0010\) Rows '1A' is not a valid IS"),
    ("NumberOfFrames", "IS", b"two", r"\(0028,0008\) Number of Frames 'two' is not a valid IS"),
    ("RescaleSlope", "DS", b"abc", r"\(0028,1053\) Rescale Slope 'abc' is not a valid DS"),
    ("RescaleIntercept", "DS", b"-1024\\0", r"\(0028,1052\) Rescale Intercept '-1024\\\\0' holds 2 values; "
                                            r"its value multiplicity is 1"),
    ("PixelSpacing", "DS", b"0.5\\abc", r"\(0028,0030\) Pixel Spacing '0.5\\\\abc' is not a valid DS"),
    ("PixelSpacing", "DS", b"0.5", r"\(0028,0030\) Pixel Spacing '0.5' holds 1 values; its value multiplicity is 2"),
    ("WindowCenter", "DS", b"1e999", r"\(0028,1050\) Window Center '1e999' is not a valid DS"),
    ("Columns", "US", b"\x20", r"\(0028,0011\) Columns ' ' is not a valid US \(Expected total bytes"),
    ("BitsAllocated", "US", b"", r"\(0028,0100\) Bits Allocated is empty"),
    ("BurnedInAnnotation", "CS", b"MAYBE", r"\(0028,0301\) Burned In Annotation 'MAYBE' is neither 'YES' nor 'NO'"),
])
def test_a_header_value_that_breaks_its_vr_is_a_dicom_error_citing_the_tag(
        site: Path, keyword: str, vr: str, value: bytes, message: str) -> None:
    bad = _with_raw(_first(site), _first(site), keyword, vr, value)

    with pytest.raises(DicomError, match=rf"site-1_00000\.dcm: {message}") as caught:
        read_dicom_hu(bad)

    assert caught.value.tag is not None
    assert caught.value.tag.startswith(message.split(r"\)")[0].replace("\\", "") + ")")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_folder_scan_reports_a_header_with_a_bad_vr_as_a_skip(site: Path) -> None:
    _with_raw(_first(site), _first(site), "RescaleSlope", "DS", b"abc")

    data = load_dicom_folder(site, preprocess=Preprocess(size=32), on_error=ErrorPolicy.SKIP)

    assert len(data) == TINY.per_site - 1
    assert [(s.path.name, s.reason) for s in data.skipped] == [
        ("site-1_00000.dcm", "(0028,1053) Rescale Slope 'abc' is not a valid DS")]


_FUZZED = (("Rows", "US"), ("Columns", "US"), ("BitsAllocated", "US"), ("BitsStored", "US"), ("HighBit", "US"),
           ("PixelRepresentation", "US"), ("SamplesPerPixel", "US"), ("InstanceNumber", "IS"),
           ("NumberOfFrames", "IS"), ("Rows", "IS"), ("RescaleSlope", "DS"), ("RescaleIntercept", "DS"),
           ("PixelSpacing", "DS"), ("WindowCenter", "DS"), ("WindowWidth", "DS"), ("SliceThickness", "DS"),
           ("ImagePositionPatient", "DS"), ("Modality", "CS"), ("PhotometricInterpretation", "CS"),
           ("BurnedInAnnotation", "CS"), ("ImageType", "CS"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(element=st.sampled_from(_FUZZED),
       value=st.one_of(st.text(max_size=24).map(lambda t: t.encode("utf-8")), st.binary(max_size=10),
                       st.lists(st.sampled_from(["1", "-1", "0.5", "1e5", "nan", "inf", "", " 7", "1.", "+"]),
                                max_size=4).map(lambda v: "\\".join(v).encode())))
def test_fuzzed_header_values_give_only_named_errors(
        site: Path, element: tuple[str, str], value: bytes) -> None:
    keyword, vr = element
    path = _with_raw(site / "site-1_00001.dcm", site / "fuzzed.dcm", keyword, vr, value)

    outcome: np.ndarray | DataError
    try:
        outcome = read_dicom_hu(path)
    except DataError as err:  # any other exception fails the test
        outcome = err

    event(f"refused: {type(outcome).__name__}" if isinstance(outcome, DataError) else "read")
    if isinstance(outcome, DataError):
        assert outcome.path == path  # a refusal names the file
    else:
        assert outcome.shape == (TINY.size, TINY.size)
