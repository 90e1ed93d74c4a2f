"""The hospital's PACS: a real Orthanc with DICOMweb on loopback, no mock server."""

from __future__ import annotations

import contextlib
import csv
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch
from dicomweb_client.api import DICOMwebClient
from flwr.common import Context, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from clients.client_app import site_data_path
from clients.pacs import (
    PacsError,
    PacsSource,
    connect,
    fetch_instance,
    load_pacs,
    read_uid_labels,
    store,
    sync,
    upload_folder,
)
from clients.sr import ModelProvenance, classification_sr, read_sr
from federation.errors import ConfigError, DataError
from federation.ingest import Preprocess, load_dataset
from federation.model import ArchConfig, HeadKind
from federation.net import free_port
from federation.train import TrainConfig
from simulations.centralised import train_centralised
from simulations.cli import app
from simulations.orthanc import OrthancConfig, OrthancServer
from simulations.pacs import run_pacs_demo

PRE = Preprocess(size=16)
ARCH = ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN)


@pytest.fixture(scope="module")
def pacs(orthanc: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(OrthancConfig(tmp_path_factory.mktemp("pacs") / "orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: OrthancServer, url: str | None = None) -> DICOMwebClient:
    return connect(url or server.cfg.dicomweb, auth=server.auth)


@pytest.fixture(scope="module")
def site(pacs: OrthancServer, tiny_federation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site-1 of the tiny federation stored in the PACS; its labels keyed by SOP Instance UID."""
    labels = tmp_path_factory.mktemp("labels") / "site-1.csv"
    assert upload_folder(tiny_federation / "site-1", pacs.cfg.dicomweb, labels, client=_client(pacs)) == 12
    return labels


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _variant(path: Path, *, modality: str = "CT", study: str | None = None) -> pydicom.Dataset:
    """A copy of a phantom slice as a new instance (new UIDs), optionally of another modality or study."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.Modality = modality
    if modality == "MR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    return ds


def test_the_pacs_gives_the_model_the_pixels_and_labels_of_the_files_and_the_same_auc(
        pacs: OrthancServer, site: Path, tiny_federation: Path, tmp_path: Path) -> None:
    folder = tiny_federation / "site-1"
    data = load_pacs(PacsSource(pacs.cfg.dicomweb, site), tmp_path / "cache", preprocess=PRE, client=_client(pacs))
    files = load_dataset(folder, preprocess=PRE)
    row = {_uid(folder / f): i for i, f in enumerate(files.files)}
    order = [row[f.removesuffix(".dcm")] for f in data.files]
    assert sorted(order) == list(range(12))
    assert torch.equal(data.images, files.images[order])
    assert torch.equal(data.labels, files.labels[order])
    assert data.skipped == ()
    # the same files, in the cache's order, as an ordinary folder: training from either gives one model
    same = tmp_path / "files"
    same.mkdir()
    with (folder / "labels.csv").open(newline="") as fh:
        label_of = {r["file"]: r["label"] for r in csv.DictReader(fh)}
    lines = ["file,label"]
    for i in order:
        shutil.copy(folder / files.files[i], same / files.files[i])
        lines.append(f"{files.files[i]},{label_of[files.files[i]]}")
    (same / "labels.csv").write_text("\n".join(lines) + "\n")
    train = TrainConfig(epochs=2, batch_size=4, seed=0)
    a = train_centralised(tmp_path / "cache", test=tiny_federation / "test", out=tmp_path / "a", arch=ARCH, train=train)
    b = train_centralised(same, test=tiny_federation / "test", out=tmp_path / "b", arch=ARCH, train=train)
    assert a.metrics.auc_macro == b.metrics.auc_macro
    assert a.model_sha256 == b.model_sha256


def test_a_rerun_retrieves_nothing_and_leaves_the_dataset_cache_valid(pacs: OrthancServer, site: Path,
                                                                      tmp_path: Path) -> None:
    source = PacsSource(pacs.cfg.dicomweb, site)
    first = sync(source, tmp_path, client=_client(pacs))
    stamp = (tmp_path / "labels.csv").stat().st_mtime_ns
    again = sync(source, tmp_path, client=_client(pacs))
    assert (first.fetched, first.cached) == (12, 0)
    assert (again.fetched, again.cached) == (0, 12)
    assert (tmp_path / "labels.csv").stat().st_mtime_ns == stamp  # unchanged: the ClientApp's cache still hits


def test_other_modalities_and_unlabelled_instances_are_reported_not_loaded(pacs: OrthancServer, site: Path,
                                                                           tiny_federation: Path,
                                                                           tmp_path: Path) -> None:
    slices = sorted((tiny_federation / "site-2").glob("*.dcm"))
    study = generate_uid()
    mr, unlabelled, labelled = (_variant(slices[0], modality="MR", study=study), _variant(slices[1], study=study),
                                _variant(slices[2], study=study))
    client = _client(pacs)
    assert store(client, pacs.cfg.dicomweb, [mr, unlabelled, labelled]) == 3
    labels = tmp_path / "labels.csv"
    labels.write_text(f"sop_instance_uid,label\n{labelled.SOPInstanceUID},cyst\n{mr.SOPInstanceUID},cyst\n")
    data = load_pacs(PacsSource(pacs.cfg.dicomweb, labels, study=study), tmp_path / "cache", preprocess=PRE,
                     client=client)
    assert list(data.files) == [f"{labelled.SOPInstanceUID}.dcm"]
    reasons = {str(s.path): s.reason for s in data.skipped}
    assert "MR instance, not CT" in reasons[str(mr.SOPInstanceUID)]
    assert "not in the labels table" in reasons[str(unlabelled.SOPInstanceUID)]
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.dcm")) == [f"{labelled.SOPInstanceUID}.dcm"]


def test_a_study_without_ct_is_a_named_error(pacs: OrthancServer, tiny_federation: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(sorted((tiny_federation / "site-2").glob("*.dcm"))[3])
    report = classification_sr(source, {"normal": 0.2, "cyst": 0.5, "tumour": 0.3},
                               provenance=ModelProvenance("0" * 64))
    client = _client(pacs)
    store(client, pacs.cfg.dicomweb, [report])  # the study holds the SR only: its CT slice is not in this PACS
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study_instance_uid,label\n{source.StudyInstanceUID},cyst\n")
    with pytest.raises(DataError, match=r"has no CT instances \(found SR\)"):
        sync(PacsSource(pacs.cfg.dicomweb, labels, study=str(source.StudyInstanceUID)), tmp_path / "c", client=client)
    with pytest.raises(DataError, match="holds no instances"):
        sync(PacsSource(pacs.cfg.dicomweb, labels, study=generate_uid()), tmp_path / "c", client=client)
    with pytest.raises(DataError, match="SR instance, not CT"):
        fetch_instance(client, pacs.cfg.dicomweb, study=str(source.StudyInstanceUID),
                       instance=str(report.SOPInstanceUID), cache=tmp_path / "c")
    with pytest.raises(DataError, match="holds no instance"):
        fetch_instance(client, pacs.cfg.dicomweb, study=str(source.StudyInstanceUID), instance=generate_uid(),
                       cache=tmp_path / "c")


def test_an_unreachable_pacs_and_refused_credentials_are_named(pacs: OrthancServer, site: Path,
                                                               tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsError, match="unreachable"):
        sync(PacsSource(dead, site), tmp_path, client=connect(dead, timeout=5))
    with pytest.raises(PacsError, match="refused the credentials"):
        sync(PacsSource(pacs.cfg.dicomweb, site), tmp_path,
             client=connect(pacs.cfg.dicomweb, auth=(pacs.cfg.user, "wrong")))
    assert not list(tmp_path.glob("*.dcm"))


class _CuttingRelay:
    """A TCP relay to the PACS that, from the ``cut_on``-th instance retrieval on (retries too), closes the reply
    after ``keep`` bytes."""

    def __init__(self, port: int, *, cut_on: int, keep: int) -> None:
        self.target, self.cut_on, self.keep = port, cut_on, keep
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.retrievals = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        first = conn.recv(65536)  # one request per connection (the client sends Connection: close)
        line = first.split(b"\r\n", 1)[0]
        limit = None
        if line.startswith(b"GET ") and b"/series/" in line and b"/instances/" in line:
            self.retrievals += 1
            limit = self.keep if self.retrievals >= self.cut_on else None
        up = socket.create_connection(("127.0.0.1", self.target))
        up.sendall(first)

        def forward(src: socket.socket, dst: socket.socket, budget: int | None) -> None:
            sent = 0
            try:
                while chunk := src.recv(65536):
                    if budget is not None and sent + len(chunk) > budget:
                        dst.sendall(chunk[: budget - sent])
                        break
                    dst.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=forward, args=(conn, up, None), daemon=True).start()
        forward(up, conn, limit)

    def close(self) -> None:
        self.sock.close()


def test_a_connection_broken_mid_retrieval_keeps_only_whole_files_and_a_rerun_resumes(
        pacs: OrthancServer, site: Path, tiny_federation: Path, tmp_path: Path) -> None:
    relay = _CuttingRelay(pacs.cfg.http_port, cut_on=4, keep=2000)  # the 4th instance's reply stops at 2,000 bytes
    url = f"http://127.0.0.1:{relay.port}/dicom-web"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(PacsError, match=r"retrieving instance 4 of 12 .* the 3 before it are cached"):
            sync(PacsSource(url, site), cache, client=connect(url, auth=pacs.auth, headers={"Connection": "close"}))
    finally:
        relay.close()
    assert relay.retrievals >= 4  # the 4th, and the client's retries of it
    kept = sorted(cache.glob("*.dcm"))
    assert len(kept) == 3
    originals = {_uid(p): p for p in (tiny_federation / "site-1").glob("*.dcm")}
    for path in kept:  # each cached file whole: it reads and its pixels are the original's
        assert pydicom.dcmread(path).PixelData == pydicom.dcmread(originals[path.stem]).PixelData
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]
    assert not (cache / "labels.csv").exists()  # no labels table for a half-filled cache: nothing loads it
    resumed = sync(PacsSource(pacs.cfg.dicomweb, site), cache, client=_client(pacs))
    assert (resumed.fetched, resumed.cached) == (9, 3)


def test_two_syncs_into_one_cache_take_turns(pacs: OrthancServer, site: Path, tmp_path: Path) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(sync(PacsSource(pacs.cfg.dicomweb, site), tmp_path, client=_client(pacs)))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    fetched = sorted(r.fetched for r in results)  # type: ignore[attr-defined]
    assert fetched == [0, 12]  # the second waited for the lock and found everything cached
    assert len(load_dataset(tmp_path, preprocess=PRE)) == 12


def test_a_classification_sr_validates_and_reads_back(orthanc: Path, tiny_federation: Path, tmp_path: Path) -> None:
    source = pydicom.dcmread(sorted((tiny_federation / "test").glob("*.dcm"))[0])
    probs = {"normal": 0.125, "cyst": 0.625, "tumour": 0.25}
    sr = classification_sr(source, probs, provenance=ModelProvenance("ab" * 32, epsilon=7.5, delta=1e-5))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert "Comprehensive3DSR" in check.stdout + check.stderr
    assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    back = read_sr(pydicom.dcmread(path))
    assert back.finding == "cyst"
    assert back.probabilities == probs
    assert back.source_sop_instance_uid == source.SOPInstanceUID
    assert back.parameters["model_sha256"] == "ab" * 32
    assert back.parameters["dp_epsilon"] == "7.500"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.Modality == "SR"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.,\n abcdefghilnorstu_\"")), max_size=300))
def test_a_labels_table_either_reads_or_names_its_fault(tmp_path: Path, text: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    try:
        column, table = read_uid_labels(path)
    except DataError as exc:
        fault = str(exc)
    else:
        assert column in ("sop_instance_uid", "study_instance_uid")
        assert table
        assert all(uid and uid[0].isdigit() and len(uid) <= 64 for uid in table)
        return
    assert str(path) in fault


def test_phantom_ct_slices_validate_as_ct_images(orthanc: Path, tiny_federation: Path) -> None:
    out = subprocess.run(["dciodvfy", str(sorted((tiny_federation / "site-1").glob("*.dcm"))[0])],
                         capture_output=True, text=True, check=False, timeout=60)
    text = out.stdout + out.stderr
    assert "CTImage" in text
    assert not [line for line in text.splitlines() if line.startswith("Error")], text


@pytest.mark.slow
def test_the_pacs_story_classifies_under_he_and_the_stored_sr_holds_the_decrypted_answer(
        orthanc: Path, tiny_federation: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_pacs_demo(tiny_federation, out, epochs=2, instances=2, arch=ARCH)
    assert summary.uploaded == 12 + 9
    assert summary.trained_from_pacs == 12
    assert len(summary.classified) == 2
    with OrthancServer(OrthancConfig(out / "pacs")) as again:  # the PACS's storage outlives the demo
        client = _client(again)
        for c in summary.classified:
            assert c["sr_probabilities"] == c["probabilities"]  # the SR holds exactly what the hospital decrypted
            assert c["sr_finding"] == c["prediction"]
            assert c["sr_source"] == c["sop_instance_uid"]
            assert c["sr_parameters"]["model_sha256"] == summary.model_sha256
            assert c["sr_parameters"]["dp_epsilon"] == "not differentially private"  # trained centrally here
            study = c["sr_url"].split("/studies/")[1].split("/")[0]
            series = c["sr_url"].split("/series/")[1].split("/")[0]
            sr = client.retrieve_instance(study, series, c["sr_sop_instance_uid"])
            path = tmp_path / f"{c['sr_sop_instance_uid']}.dcm"
            sr.save_as(path, enforce_file_format=True)
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60)
            text = check.stdout + check.stderr
            assert "Comprehensive3DSR" in text
            assert not [line for line in text.splitlines() if line.startswith("Error")], text
            assert read_sr(sr).probabilities == c["probabilities"]


def test_a_supernode_reads_its_site_from_the_pacs(pacs: OrthancServer, site: Path, tiny_federation: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in pacs.env().items():  # a SuperNode has its credentials in its environment, not its config
        monkeypatch.setenv(key, value)
    node = {"pacs-url": pacs.cfg.dicomweb, "pacs-labels": str(site), "data-path": str(tmp_path / "cache")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    path = site_data_path(context)
    assert path == tmp_path / "cache"
    assert len(load_dataset(path, preprocess=PRE)) == 12
    with pytest.raises(ConfigError, match="needs `data-path`"):
        site_data_path(Context(run_id=1, node_id=1, node_config={"pacs-url": pacs.cfg.dicomweb},
                               state=RecordDict(), run_config={}))


def test_the_cli_uploads_pulls_scans_and_trains_from_the_pacs(orthanc: Path, tiny_federation: Path,
                                                              tmp_path: Path) -> None:
    with OrthancServer(OrthancConfig(tmp_path / "pacs")) as pacs:  # its own PACS: scan reports every other instance
        _cli_story(pacs, tiny_federation, tmp_path)


def _cli_story(pacs: OrthancServer, tiny_federation: Path, tmp_path: Path) -> None:
    runner, env = CliRunner(), pacs.env()
    labels = tmp_path / "labels.csv"
    up = runner.invoke(app, ["pacs", "upload", str(tiny_federation / "site-2"), "--url", pacs.cfg.dicomweb,
                             "--labels-out", str(labels)], env=env)
    assert up.exit_code == 0, up.output
    assert "stored 12 instances" in up.stdout
    cache = tmp_path / "cache"
    scan = runner.invoke(app, ["scan", "--pacs", pacs.cfg.dicomweb, "--pacs-labels", str(labels), "--data",
                               str(cache), "--size", "16"], env=env)
    assert scan.exit_code == 0, scan.output  # non-zero if anything were skipped
    assert "│ 12 " in scan.stdout  # the images column
    assert len((cache / "labels.csv").read_text().splitlines()) == 1 + 12
    train = runner.invoke(app, ["train", "--pacs", pacs.cfg.dicomweb, "--pacs-labels", str(labels), "--data",
                                str(cache), "--test", str(tiny_federation / "test"), "--epochs", "1", "--size", "16",
                                "--out", str(tmp_path / "run")], env=env)
    assert train.exit_code == 0, train.output
    assert "12 training images" in train.stdout
    no_labels = runner.invoke(app, ["train", "--pacs", pacs.cfg.dicomweb, "--data", str(cache), "--out",
                                    str(tmp_path / "x")], env=env)
    assert isinstance(no_labels.exception, ConfigError)
    assert "--pacs-labels" in str(no_labels.exception)
    refused = runner.invoke(app, ["pacs", "pull", "--url", pacs.cfg.dicomweb, "--labels", str(labels), "--cache",
                                  str(tmp_path / "c2")], env={**env, "PRIVRAD_PACS_PASSWORD": "wrong"})
    assert isinstance(refused.exception, PacsError)
    assert "refused the credentials" in str(refused.exception)
