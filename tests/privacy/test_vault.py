"""Vault: bit-exact round trip, de-identification, and loud failures on tampering, wrong keys, truncation."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from privacy.vault import (
    KEEP,
    Keyring,
    VaultError,
    get_object,
    list_objects,
    put_file,
    rotate_key,
)
from simulations.cli import app


@pytest.fixture
def slices(tiny_federation: Path) -> list[Path]:
    return sorted((tiny_federation / "site-1").glob("*.dcm"))[:6]


def test_round_trip_is_bit_exact_and_de_identified(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "site-1.key", site="site-1")
    assert (os.stat(ring.path).st_mode & 0o777) == 0o600
    infos = [put_file(tmp_path / "vault", f, ring) for f in slices]
    assert sorted(i.object_id for i in list_objects(tmp_path / "vault")) == sorted(i.object_id for i in infos)
    for src, info in zip(slices, infos, strict=True):
        original = pydicom.dcmread(src)
        ds, meta = get_object(tmp_path / "vault", info.object_id, Keyring.load(ring.path))
        assert (ds.pixel_array == original.pixel_array).all()
        assert ds.pixel_array.dtype == original.pixel_array.dtype
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
        assert meta["source_name"] == src.name
        # identifying attributes are gone or replaced; the image stays a valid CT slice
        assert str(ds.PatientID) != str(original.PatientID)
        assert ds.StudyInstanceUID != original.StudyInstanceUID
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert "StudyDate" not in ds
        assert "Manufacturer" not in ds
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for keyword in ("RescaleIntercept", "RescaleSlope", "PixelSpacing", "Modality"):
            assert ds[keyword].value == original[keyword].value
        kept = {e.keyword for e in ds} - {"PixelData"}
        assert kept <= set(KEEP) | {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                                    "FrameOfReferenceUID", "PatientName", "PatientID", "PatientIdentityRemoved",
                                    "DeidentificationMethodCodeSequence", "DeidentificationMethod"}
    header = (tmp_path / "vault" / "objects" / f"{infos[0].object_id}.pvo").read_bytes()
    assert slices[0].name.encode() not in header  # the file name is sealed, not in the clear


def test_tampering_truncation_and_wrong_keys_fail_loudly(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    info = put_file(tmp_path / "v", slices[0], ring)
    path = tmp_path / "v" / "objects" / f"{info.object_id}.pvo"
    good = path.read_bytes()

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit of the ciphertext/tag
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, ring)
    at = good.index(b'"original_bytes":') + len(b'"original_bytes":')  # a header digit, same length
    digit = b"1" if good[at:at + 1] != b"1" else b"2"
    path.write_bytes(good[:at] + digit + good[at + 1:])
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, ring)
    for cut in (len(good) - 5, 40, 10):
        path.write_bytes(good[:cut])
        with pytest.raises(VaultError, match=r"truncated|authentication failed|not a privrad vault object"):
            get_object(tmp_path / "v", info.object_id, ring)
        if cut < 50:  # cut inside the header: listing, which reads headers only, says so too
            with pytest.raises(VaultError, match=rf"{info.object_id}.pvo: truncated"):
                list(list_objects(tmp_path / "v"))

    path.write_bytes(good)
    other = Keyring.create(tmp_path / "b.key", site="site-1")
    with pytest.raises(VaultError, match="does not hold"):
        get_object(tmp_path / "v", info.object_id, other)
    forged = Keyring(tmp_path / "c.key", "site-1", {ring.active: other.keys[other.active]}, ring.active)
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, forged)
    with pytest.raises(VaultError, match="site site-2"):
        get_object(tmp_path / "v", info.object_id, Keyring.create(tmp_path / "d.key", site="site-2"))
    with pytest.raises(VaultError, match="no object"):
        get_object(tmp_path / "v", "0" * 32, ring)
    assert (get_object(tmp_path / "v", info.object_id, ring)[0].pixel_array
            == pydicom.dcmread(slices[0]).pixel_array).all()


def test_key_rotation_reseals_without_loss_and_retires_the_old_key(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "site.key", site="site-1")
    old_key = ring.active
    infos = [put_file(tmp_path / "v", f, ring) for f in slices]
    old_blobs = {i.object_id: (tmp_path / "v" / "objects" / f"{i.object_id}.pvo").read_bytes() for i in infos}
    assert rotate_key(tmp_path / "v", ring) == len(slices)
    ring = Keyring.load(ring.path)
    assert old_key not in ring.keys
    assert {i.key_id for i in list_objects(tmp_path / "v")} == {ring.active}
    for src, info in zip(slices, infos, strict=True):
        assert (get_object(tmp_path / "v", info.object_id, ring)[0].pixel_array
                == pydicom.dcmread(src).pixel_array).all()
        assert (tmp_path / "v" / "objects" / f"{info.object_id}.pvo").read_bytes() != old_blobs[info.object_id]


def test_keyring_refuses_overwrite_and_bad_files(tmp_path: Path) -> None:
    Keyring.create(tmp_path / "k", site="s")
    with pytest.raises(VaultError, match="refusing to overwrite"):
        Keyring.create(tmp_path / "k", site="s")
    (tmp_path / "bad").write_text("{}")
    with pytest.raises(VaultError, match="not a privrad keyring"):
        Keyring.load(tmp_path / "bad")
    with pytest.raises(VaultError, match="no such keyring"):
        Keyring.load(tmp_path / "missing")


def test_vault_cli_round_trip(tmp_path: Path, tiny_federation: Path) -> None:
    from typer.testing import CliRunner


    runner = CliRunner()
    ring, vault = str(tmp_path / "s.key"), str(tmp_path / "v")
    assert runner.invoke(app, ["vault", "keygen", "--keyring", ring, "--site", "site-1"]).exit_code == 0
    put = runner.invoke(app, ["vault", "put", "--vault", vault, "--keyring", ring, str(tiny_federation / "site-1")])
    assert put.exit_code == 0, put.output
    assert "12 slices" in put.output
    assert "bit-exact" in put.output
    listed = runner.invoke(app, ["vault", "list", "--vault", vault])
    assert listed.exit_code == 0
    assert "12 objects" in listed.output
    object_id = sorted((tmp_path / "v" / "objects").glob("*.pvo"))[0].stem
    rotated = runner.invoke(app, ["vault", "rotate-key", "--vault", vault, "--keyring", ring])
    assert rotated.exit_code == 0
    assert "re-sealed 12 objects" in rotated.output
    got = runner.invoke(app, ["vault", "get", "--vault", vault, "--keyring", ring, object_id, "--out",
                              str(tmp_path / "x.dcm"), "--uncompressed"])
    assert got.exit_code == 0, got.output
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    sources = [pydicom.dcmread(f).pixel_array for f in sorted((tiny_federation / "site-1").glob("*.dcm"))]
    assert any((ds.pixel_array == src).all() for src in sources)
    again = runner.invoke(app, ["vault", "keygen", "--keyring", ring, "--site", "site-1"])
    assert again.exit_code != 0
