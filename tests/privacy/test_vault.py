"""Vault: bit-exact round trip, de-identification, and loud failures on tampering, swaps, bad ids, races, wrong keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from federation.errors import DataError, DicomError
from privacy.vault import (
    KEEP,
    MAGIC,
    BurnedIn,
    Keyring,
    ObjectInfo,
    VaultError,
    get_object,
    list_objects,
    put_file,
    rotate_key,
)
from simulations.cli import app

_EVENTS: list[tuple[str, tuple[Any, ...]]] | None = None
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _EVENTS is not None and event in ("open", "os.listdir", "os.scandir", "os.mkdir"):
        _EVENTS.append((event, args))


@contextmanager
def file_system_events() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record the interpreter's own audit events for opening files and folders (PEP 578), no patching."""
    global _EVENTS, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _EVENTS = []
    try:
        yield _EVENTS
    finally:
        _EVENTS = None


@pytest.fixture
def slices(tiny_federation: Path) -> list[Path]:
    return sorted((tiny_federation / "site-1").glob("*.dcm"))[:6]


def _obj(vault: Path, object_id: str) -> Path:
    return vault / "objects" / f"{object_id}.pvo"


def _variant(src: Path, dst: Path, **attrs: Any) -> Path:
    """A copy of ``src`` with attributes set (``None`` deletes one)."""
    ds = pydicom.dcmread(src)
    for keyword, value in attrs.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _decrypt(blob: bytes, ring: Keyring) -> tuple[dict[str, Any], bytes]:
    """Open an object by its documented layout: magic, header length, header (AAD), nonce, AES-GCM body."""
    (n,) = struct.unpack(">I", blob[len(MAGIC):len(MAGIC) + 4])
    raw = blob[len(MAGIC) + 4:len(MAGIC) + 4 + n]
    header = json.loads(raw)
    nonce = blob[len(MAGIC) + 4 + n:len(MAGIC) + 16 + n]
    payload = AESGCM(ring.keys[header["key_id"]]).decrypt(nonce, blob[len(MAGIC) + 16 + n:], MAGIC + raw)
    return header, payload


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
        assert meta["pseudonym"] == info.pseudonym == ring.pseudonym(src.name)
        assert info.burned_in is BurnedIn.NO
        assert info.profile
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
    assert len({i.pseudonym for i in infos}) == len(slices)


def test_an_object_holds_no_source_name_only_its_keyed_pseudonym(tmp_path: Path, slices: list[Path]) -> None:
    source = Path(shutil.copy(slices[0], tmp_path / "MRN12345678_DOE^JANE.dcm"))
    original = pydicom.dcmread(source)
    ring = Keyring.create(tmp_path / "s.key", site="site-1")
    runner = CliRunner()

    put = runner.invoke(app, ["vault", "put", "--vault", str(tmp_path / "v"), "--keyring", str(ring.path),
                              str(source)])
    (path,) = (tmp_path / "v" / "objects").glob("*.pvo")
    listed = runner.invoke(app, ["vault", "list", "--vault", str(tmp_path / "v")])
    got = runner.invoke(app, ["vault", "get", "--vault", str(tmp_path / "v"), "--keyring", str(ring.path),
                              path.stem, "--out", str(tmp_path / "back.dcm")])

    assert put.exit_code == listed.exit_code == got.exit_code == 0, put.output + listed.output + got.output
    header, payload = _decrypt(path.read_bytes(), ring)
    pseudonym = ring.pseudonym(source.name)
    assert header["pseudonym"] == pseudonym
    assert pseudonym in put.output
    assert path.stem in put.output
    assert pseudonym in got.output
    for secret in ("MRN12345678", "DOE^JANE", "12345678", str(original.PatientName), str(original.PatientID)):
        assert secret.encode() not in path.read_bytes()
        assert secret.encode() not in payload
        assert secret not in put.output + listed.output + got.output
    assert "MRN" not in (tmp_path / "back.dcm").read_bytes().decode("latin-1")
    assert ring.pseudonym(source.name) == Keyring.load(ring.path).pseudonym(source.name) != \
        Keyring.create(tmp_path / "other.key", site="site-1").pseudonym(source.name)  # keyed: another site, another


def test_tampering_truncation_and_wrong_keys_fail_loudly(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    info = put_file(tmp_path / "v", slices[0], ring)
    path = _obj(tmp_path / "v", info.object_id)
    good = path.read_bytes()

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit of the ciphertext/tag
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, ring)
    at = good.index(b'"original_bytes":') + len(b'"original_bytes":')  # a header digit, same length
    digit = b"1" if good[at:at + 1] != b"1" else b"2"
    path.write_bytes(good[:at] + digit + good[at + 1:])
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, ring)
    at = good.index(b'"pseudonym":"src-') + len(b'"pseudonym":"src-')  # one byte of the AAD's pseudonym
    path.write_bytes(good[:at] + (b"0" if good[at:at + 1] != b"0" else b"1") + good[at + 1:])
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, ring)
    path.write_bytes(good.replace(b'"profile":true', b'"profile":"yes"'))
    with pytest.raises(VaultError, match="damaged header"):
        get_object(tmp_path / "v", info.object_id, ring)
    for cut in (len(good) - 5, 40, 10):
        path.write_bytes(good[:cut])
        with pytest.raises(VaultError, match=r"truncated|authentication failed|not a privrad vault object"):
            get_object(tmp_path / "v", info.object_id, ring)
        if cut < 50:  # cut inside the header: listing, which reads headers only, says so too
            with pytest.raises(VaultError, match=rf"{info.object_id}.pvo: truncated"):
                list(list_objects(tmp_path / "v"))
    path.write_bytes(b"PRIVRAD-VAULT\x01" + good[len(MAGIC):])
    with pytest.raises(VaultError, match="vault object format 1, this privrad reads format 2 only"):
        get_object(tmp_path / "v", info.object_id, ring)

    path.write_bytes(good)
    other = Keyring.create(tmp_path / "b.key", site="site-1")
    with pytest.raises(VaultError, match="does not hold"):
        get_object(tmp_path / "v", info.object_id, other)
    forged = Keyring(tmp_path / "c.key", "site-1", {ring.active: other.keys[other.active]}, ring.active,
                     ring.pseudonym_key)
    with pytest.raises(VaultError, match="authentication failed"):
        get_object(tmp_path / "v", info.object_id, forged)
    with pytest.raises(VaultError, match="site site-2"):
        get_object(tmp_path / "v", info.object_id, Keyring.create(tmp_path / "d.key", site="site-2"))
    with pytest.raises(VaultError, match="no object"):
        get_object(tmp_path / "v", "0" * 32, ring)
    assert (get_object(tmp_path / "v", info.object_id, ring)[0].pixel_array
            == pydicom.dcmread(slices[0]).pixel_array).all()


def test_an_object_copied_over_another_is_refused(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    a, b = (put_file(tmp_path / "v", f, ring) for f in slices[:2])

    shutil.copyfile(_obj(tmp_path / "v", a.object_id), _obj(tmp_path / "v", b.object_id))

    with pytest.raises(VaultError, match=f"object file {b.object_id} holds object {a.object_id}"):
        get_object(tmp_path / "v", b.object_id, ring)
    with pytest.raises(VaultError, match=f"object file {b.object_id} holds object {a.object_id}"):
        list(list_objects(tmp_path / "v"))
    with pytest.raises(VaultError, match=f"object file {b.object_id} holds object {a.object_id}"):
        rotate_key(tmp_path / "v", ring)
    assert Keyring.load(ring.path).keys.keys() >= {a.key_id}  # the interrupted rotation kept the old key
    assert (get_object(tmp_path / "v", a.object_id, ring)[0].pixel_array
            == pydicom.dcmread(slices[0]).pixel_array).all()


@pytest.mark.parametrize("bad_id", ["../outside", "ABS", "a" * 1000, "0" * 31, "0" * 32 + "\n", "0" * 31 + "G",
                                    "./" + "0" * 30])
def test_a_malformed_object_id_is_refused_before_any_file_is_opened(
        tmp_path: Path, slices: list[Path], bad_id: str) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    info = put_file(tmp_path / "v", slices[0], ring)
    blob = _obj(tmp_path / "v", info.object_id).read_bytes()
    (tmp_path / "v" / "outside.pvo").write_bytes(blob)  # where "../outside" would lead from objects/
    if bad_id == "ABS":
        bad_id = str(tmp_path / "v" / "outside")  # an absolute path replaces the folder in a path join
    shown = re.escape(repr(bad_id)[:40])

    with file_system_events() as events, pytest.raises(VaultError, match=rf"object id {shown}.* is not 32 lowercase"):
        get_object(tmp_path / "v", bad_id, ring)

    assert [e for e in events if str(tmp_path) in str(e[1][0])] == []
    runner = CliRunner()
    got = runner.invoke(app, ["vault", "get", "--vault", str(tmp_path / "v"), "--keyring", str(ring.path), bad_id,
                              "--out", str(tmp_path / "x.dcm")])
    assert isinstance(got.exception, VaultError)
    assert not (tmp_path / "x.dcm").exists()


def test_a_folder_that_is_not_an_object_id_is_named_by_list(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    info = put_file(tmp_path / "v", slices[0], ring)
    shutil.copyfile(_obj(tmp_path / "v", info.object_id), tmp_path / "v" / "objects" / "DOE^JANE.pvo")

    with pytest.raises(VaultError, match=r"DOE\^JANE.pvo: not a vault object's name"):
        list(list_objects(tmp_path / "v"))


def test_writes_are_durable_the_object_folder_is_fsynced(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    o_directory = getattr(os, "O_DIRECTORY", 0)
    assert o_directory  # Linux: os.open(folder, O_DIRECTORY) then fsync is how a rename is made durable

    with file_system_events() as events:
        info = put_file(tmp_path / "v", slices[0], ring)
        rotate_key(tmp_path / "v", ring)

    opened = [Path(args[0]) for event, args in events
              if event == "open" and isinstance(args[2], int) and args[2] & o_directory]
    assert opened.count(tmp_path / "v" / "objects") == 2  # the put and the re-seal
    assert opened.count(tmp_path) == 2  # the keyring: new key saved, then the old one dropped
    assert _obj(tmp_path / "v", info.object_id).is_file()


def test_key_rotation_reseals_without_loss_and_retires_the_old_key(tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "site.key", site="site-1")
    old_key = ring.active
    infos = [put_file(tmp_path / "v", f, ring) for f in slices]
    old_blobs = {i.object_id: _obj(tmp_path / "v", i.object_id).read_bytes() for i in infos}
    assert rotate_key(tmp_path / "v", ring) == len(slices)
    assert old_key not in ring.keys  # the caller's keyring follows the saved one
    ring = Keyring.load(ring.path)
    assert old_key not in ring.keys
    assert {i.key_id for i in list_objects(tmp_path / "v")} == {ring.active}
    for src, info in zip(slices, infos, strict=True):
        assert (get_object(tmp_path / "v", info.object_id, ring)[0].pixel_array
                == pydicom.dcmread(src).pixel_array).all()
        assert _obj(tmp_path / "v", info.object_id).read_bytes() != old_blobs[info.object_id]
        assert get_object(tmp_path / "v", info.object_id, ring)[1]["pseudonym"] == info.pseudonym


def _put_many(vault: Path, ring_path: Path, sources: list[Path], out: Any) -> None:
    ring = Keyring.load(ring_path)  # loaded once, before the rotations: put must not trust its active key
    ids = []
    for source in sources:
        ids.append(put_file(vault, source, ring).object_id)
        time.sleep(0.005)
    out.put(ids)


def _rotate_while_putting(vault: Path, ring_path: Path, rotations: int, total: int, out: Any) -> None:
    ring = Keyring.load(ring_path)
    retired, overlapped = [ring.active], 0
    deadline = time.monotonic() + 30
    while len(list((vault / "objects").glob("*.pvo"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    for _ in range(rotations):
        overlapped += len(list((vault / "objects").glob("*.pvo"))) < total
        rotate_key(vault, ring)
        retired.append(ring.active)
    out.put((retired[:-1], overlapped))


def _check_after_race(vault: Path, ring_path: Path, ids: list[str], retired: list[str],
                      sources: dict[str, Path]) -> None:
    ring = Keyring.load(ring_path)
    listed = {i.object_id: i for i in list_objects(vault)}
    assert sorted(listed) == sorted(ids)
    assert {i.key_id for i in listed.values()} == {ring.active}
    assert list(ring.keys) == [ring.active]
    assert not set(retired) & set(ring.keys)
    pixels = {ring.pseudonym(p.name): pydicom.dcmread(p).pixel_array for p in sources.values()}
    for object_id, info in listed.items():
        ds, meta = get_object(vault, object_id, ring)
        assert (ds.pixel_array == pixels[meta["pseudonym"]]).all()
        assert info.pseudonym == meta["pseudonym"]


def test_a_rotation_racing_puts_in_other_processes_loses_nothing(tmp_path: Path, tiny_federation: Path) -> None:
    files = sorted(tiny_federation.rglob("*.dcm"))
    batches = [files[:20], files[13:33]]
    ring = Keyring.create(tmp_path / "s.key", site="site-1")
    vault = tmp_path / "v"
    ctx = multiprocessing.get_context("fork")
    ids_out, rot_out = ctx.Queue(), ctx.Queue()

    putters = [ctx.Process(target=_put_many, args=(vault, ring.path, b, ids_out)) for b in batches]
    rotator = ctx.Process(target=_rotate_while_putting, args=(vault, ring.path, 3, 40, rot_out))
    for p in (*putters, rotator):
        p.start()
    ids = [i for _ in putters for i in ids_out.get(timeout=60)]
    retired, overlapped = rot_out.get(timeout=60)
    for p in (*putters, rotator):
        p.join(timeout=30)

    assert [p.exitcode for p in (*putters, rotator)] == [0, 0, 0]
    assert len(ids) == 40
    assert overlapped >= 1  # at least one rotation started while puts were still coming
    assert len(retired) == 3
    _check_after_race(vault, ring.path, ids, retired, {f.name: f for f in files})


def test_a_rotation_racing_puts_in_other_threads_loses_nothing(tmp_path: Path, tiny_federation: Path) -> None:
    files = sorted((tiny_federation / "site-2").glob("*.dcm"))
    ring = Keyring.create(tmp_path / "s.key", site="site-1")
    vault = tmp_path / "v"
    ids_out: queue.Queue[list[str]] = queue.Queue()
    rot_out: queue.Queue[tuple[list[str], int]] = queue.Queue()

    threads = [threading.Thread(target=_put_many, args=(vault, ring.path, files[k::2], ids_out)) for k in (0, 1)]
    threads.append(threading.Thread(target=_rotate_while_putting, args=(vault, ring.path, 2, len(files), rot_out)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [i for _ in range(2) for i in ids_out.get_nowait()]
    retired, overlapped = rot_out.get_nowait()

    assert len(ids) == len(files)
    assert overlapped >= 1
    _check_after_race(vault, ring.path, ids, retired, {f.name: f for f in files})


def test_burned_in_annotation_yes_is_refused_or_sealed_flagged(tmp_path: Path, slices: list[Path]) -> None:
    marked = _variant(slices[0], tmp_path / "marked.dcm", BurnedInAnnotation="YES")
    ring = Keyring.create(tmp_path / "a.key", site="site-1")

    with pytest.raises(DicomError, match=r"\(0028,0301\) Burned In Annotation is YES: the pixels may show "
                                         r"identifying text; or seal it flagged.*--allow-burned-in"):
        put_file(tmp_path / "v", marked, ring)
    assert list(list_objects(tmp_path / "v")) == []
    info = put_file(tmp_path / "v", marked, ring, allow_burned_in=True)
    ds, _ = get_object(tmp_path / "v", info.object_id, ring)

    assert info.burned_in is BurnedIn.YES
    assert not info.profile
    assert [i.profile for i in list_objects(tmp_path / "v")] == [False]
    assert ds.PatientIdentityRemoved == "NO"
    assert ds.BurnedInAnnotation == "YES"
    assert "DeidentificationMethodCodeSequence" not in ds
    assert "burned-in annotation yes: pixels not de-identified" in ds.DeidentificationMethod
    assert (ds.pixel_array == pydicom.dcmread(marked).pixel_array).all()
    listed = CliRunner().invoke(app, ["vault", "list", "--vault", str(tmp_path / "v")])
    assert re.search(r"1 NOT de-identified, their pixels may show\s+text \(burned-in\s+annotation:\s+yes 1\)",
                     listed.output), listed.output
    assert re.search(rf"{info.object_id}\s+{info.pseudonym}\s+NO\s", listed.output), listed.output


def test_a_missing_burned_in_annotation_is_refused_only_where_text_is_common(
        tmp_path: Path, slices: list[Path]) -> None:
    ring = Keyring.create(tmp_path / "a.key", site="site-1")
    derived = _variant(slices[0], tmp_path / "derived.dcm", BurnedInAnnotation=None)
    capture = _variant(slices[0], tmp_path / "sc.dcm", BurnedInAnnotation=None, ImageType=["ORIGINAL", "PRIMARY"],
                       SOPClassUID=pydicom.uid.SecondaryCaptureImageStorage)
    ultrasound = _variant(slices[0], tmp_path / "us.dcm", BurnedInAnnotation=None, Modality="US",
                          ImageType=["ORIGINAL", "PRIMARY"])
    original = _variant(slices[0], tmp_path / "orig.dcm", BurnedInAnnotation=None, ImageType=["ORIGINAL", "PRIMARY",
                                                                                               "AXIAL"])

    for path, why in ((derived, r"DERIVED\\SECONDARY\\AXIAL image"), (capture, "Secondary Capture image"),
                      (ultrasound, "US image")):
        with pytest.raises(DicomError, match=rf"\(0028,0301\) Burned In Annotation is absent on a {why}"):
            put_file(tmp_path / "v", path, ring)
    flagged = put_file(tmp_path / "v", derived, ring, allow_burned_in=True)
    plain = put_file(tmp_path / "v", original, ring)

    assert (flagged.burned_in, flagged.profile) == (BurnedIn.UNKNOWN, False)
    assert (plain.burned_in, plain.profile) == (BurnedIn.ABSENT, True)
    assert get_object(tmp_path / "v", flagged.object_id, ring)[0].PatientIdentityRemoved == "NO"
    assert get_object(tmp_path / "v", plain.object_id, ring)[0].PatientIdentityRemoved == "YES"


def test_a_header_value_that_breaks_its_vr_is_a_named_error(tmp_path: Path, slices: list[Path]) -> None:
    ds = pydicom.dcmread(slices[0])
    tag = pydicom.tag.Tag("RescaleSlope")
    ds[tag] = pydicom.dataelem.RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    ring = Keyring.create(tmp_path / "a.key", site="site-1")

    with pytest.raises(DicomError, match=r"bad\.dcm: \(0028,1053\) Rescale Slope 'abc' is not a valid DS"):
        put_file(tmp_path / "v", tmp_path / "bad.dcm", ring)


def test_keyring_refuses_overwrite_and_bad_files(tmp_path: Path) -> None:
    Keyring.create(tmp_path / "k", site="s")
    with pytest.raises(VaultError, match="refusing to overwrite"):
        Keyring.create(tmp_path / "k", site="s")
    (tmp_path / "bad").write_text("{}")
    with pytest.raises(VaultError, match="not a privrad keyring"):
        Keyring.load(tmp_path / "bad")
    (tmp_path / "old").write_text(json.dumps({"format": "privrad-keyring/1", "site": "s", "active": "a", "keys": {}}))
    with pytest.raises(VaultError, match="'privrad-keyring/1' is from before vault objects were bound"):
        Keyring.load(tmp_path / "old")
    with pytest.raises(VaultError, match="no such keyring"):
        Keyring.load(tmp_path / "missing")


def test_vault_cli_round_trip(tmp_path: Path, tiny_federation: Path) -> None:
    runner = CliRunner()
    ring, vault = str(tmp_path / "s.key"), str(tmp_path / "v")
    assert runner.invoke(app, ["vault", "keygen", "--keyring", ring, "--site", "site-1"]).exit_code == 0
    put = runner.invoke(app, ["vault", "put", "--vault", vault, "--keyring", ring, str(tiny_federation / "site-1")])
    assert put.exit_code == 0, put.output
    assert "12 slices" in put.output
    assert "bit-exact" in put.output
    assert "site-1_0" not in put.output
    listed = runner.invoke(app, ["vault", "list", "--vault", vault])
    assert listed.exit_code == 0
    assert "12 objects" in listed.output
    object_id = sorted((tmp_path / "v" / "objects").glob("*.pvo"))[0].stem
    assert object_id in put.output
    assert object_id in listed.output  # whole ids, in CliRunner's 80 columns
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


def test_vault_cli_put_skips_refused_slices_when_asked(tmp_path: Path, slices: list[Path]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in slices[:3]:
        shutil.copy(f, folder / f.name)
    _variant(slices[3], folder / "marked.dcm", BurnedInAnnotation="YES")
    runner = CliRunner()
    ring, vault = str(tmp_path / "s.key"), str(tmp_path / "v")
    assert runner.invoke(app, ["vault", "keygen", "--keyring", ring, "--site", "site-1"]).exit_code == 0

    stopped = runner.invoke(app, ["vault", "put", "--vault", vault, "--keyring", ring, str(folder)])
    skipped = runner.invoke(app, ["vault", "put", "--vault", vault, "--keyring", ring, str(folder), "--skip-bad"])

    assert isinstance(stopped.exception, DicomError)
    assert skipped.exit_code == 0, skipped.output
    assert "sealed 3 slices" in skipped.output
    assert "1 files skipped" in skipped.output


_FUZZED = (("Rows", "US"), ("BitsAllocated", "US"), ("BitsStored", "US"), ("PixelRepresentation", "US"),
           ("InstanceNumber", "IS"), ("RescaleSlope", "DS"), ("PixelSpacing", "DS"), ("WindowWidth", "DS"),
           ("Modality", "CS"), ("ImageType", "CS"), ("BurnedInAnnotation", "CS"), ("SOPClassUID", "UI"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each invalid value it reads
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(element=st.sampled_from(_FUZZED),
       value=st.one_of(st.text(max_size=16).map(lambda t: t.encode("utf-8")), st.binary(max_size=6),
                       st.sampled_from([b"1", b"0.5\\0.5", b"16", b"YES", b"NO", b"DERIVED", b"1e999", b"nan"])))
def test_fuzzed_header_values_are_sealed_or_refused_with_named_errors(
        tmp_path: Path, slices: list[Path], element: tuple[str, str], value: bytes) -> None:
    keyword, vr = element
    ds = pydicom.dcmread(slices[1])
    if len(value) % 2 and vr not in ("US", "SS"):
        value += b" "
    tag = pydicom.tag.Tag(keyword)
    ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(tmp_path / "fuzzed.dcm", enforce_file_format=True)
    ring = Keyring(tmp_path / "k", "site-1", {"k1": bytes(32)}, "k1", bytes(32))
    if not ring.path.exists():
        ring.save()

    outcome: ObjectInfo | DataError
    try:
        outcome = put_file(tmp_path / "v", tmp_path / "fuzzed.dcm", ring, allow_burned_in=True)
    except DataError as err:  # any other exception fails the test
        outcome = err

    event(f"refused: {type(outcome).__name__}" if isinstance(outcome, DataError) else "sealed")
    if isinstance(outcome, DataError):
        assert outcome.path == tmp_path / "fuzzed.dcm"  # a refusal names the file
    else:
        back, _ = get_object(tmp_path / "v", outcome.object_id, ring)
        assert (back.pixel_array == pydicom.dcmread(tmp_path / "fuzzed.dcm").pixel_array).all()
