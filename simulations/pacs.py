"""The PACS story's glue: classify a PACS instance under HE and store the result back as a DICOM SR.

:func:`run_pacs_demo` (``privrad pacs demo``, ``make demo-pacs``) is the story end to end: a real
Orthanc on loopback holds a phantom hospital, the hospital trains from it, the model is compiled
and served, instances are classified on ciphertext and the SRs land in the same PACS.

The hospital retrieves the instance from its own PACS into its cache (:func:`clients.pacs.fetch_instance`),
encrypts it and has the service classify the ciphertext (:class:`he_inference.client.ServiceClient`),
decrypts the logits, builds the Structured Report (:func:`clients.sr.classification_sr`) and
stores it in the same PACS (STOW-RS). The service sees ciphertexts only; the SR never leaves the hospital.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from dicomweb_client.api import DICOMwebClient

from clients.pacs import PacsSource, connect, fetch_instance, store, sync, upload_folder
from clients.sr import ModelProvenance, SrContent, classification_sr, read_sr
from federation.errors import ConfigError, DataError
from federation.model import ArchConfig, HeadKind
from federation.storage import atomic_write_json, load_checkpoint
from federation.train import TrainConfig
from he_inference.artifact import MetaKey
from he_inference.client import Classification, ServiceClient
from he_inference.compiler import compile_checkpoint, load_calibration
from he_inference.tokens import TokenStore
from simulations.centralised import train_centralised
from simulations.children import stop_child
from simulations.he_demo import CALIBRATION_IMAGES, start_service
from simulations.orthanc import OrthancConfig, OrthancServer

__all__ = ["PacsClassification", "PacsDemoSummary", "classify_pacs_instance", "provenance_of", "read_stored_sr",
           "run_pacs_demo"]

log = logging.getLogger(__name__)

DEMO_EPOCHS = 30
DEMO_INSTANCES = 2


@dataclass(frozen=True)
class PacsClassification:
    """One instance classified under HE; where its SR was stored (empty when not stored)."""

    classification: Classification
    sop_instance_uid: str
    sr_sop_instance_uid: str = ""
    sr_url: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"sop_instance_uid": self.sop_instance_uid, **self.classification.to_dict(),
                "sr_sop_instance_uid": self.sr_sop_instance_uid, "sr_url": self.sr_url}


def provenance_of(service: ServiceClient, *, expect_sha256: str = "") -> ModelProvenance:
    """The model the service declares it runs (its checkpoint's sha256 and privacy record).

    The service is not trusted with data but could misdeclare its model: ``expect_sha256`` pins the
    checkpoint the hospital approved, and any other is refused before an image is encrypted.
    """
    meta = service.model.meta
    sha = str(meta.get(MetaKey.SOURCE_SHA256, ""))
    if expect_sha256 and sha != expect_sha256:
        raise ConfigError(f"the service runs model {sha or '(undeclared)'}, not the approved {expect_sha256}: "
                          "refusing to classify with it")
    privacy = meta.get(MetaKey.PRIVACY) or {}
    eps = privacy.get("epsilon_max") if privacy.get("dp") else None
    return ModelProvenance(sha256=sha, epsilon=None if eps is None else float(eps),
                           delta=privacy.get("delta") if privacy.get("dp") else None)


def classify_pacs_instance(service: ServiceClient, pacs: DICOMwebClient, url: str, *, study: str, series: str,
                           instance: str, cache: Path, store_sr: bool = True, expect_sha256: str = ""
                           ) -> PacsClassification:
    """Retrieve ``instance`` into ``cache``, classify it under HE, store the SR in the same PACS."""
    provenance = provenance_of(service, expect_sha256=expect_sha256)
    path = fetch_instance(pacs, url, study=study, series=series, instance=instance, cache=cache)
    result = service.classify_files([path])[0]
    if not store_sr:
        return PacsClassification(result, instance)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    sr = classification_sr(source, result.prediction.probabilities, provenance=provenance)
    store(pacs, url, [sr])
    sr_url = (f"{url.rstrip('/')}/studies/{sr.StudyInstanceUID}/series/{sr.SeriesInstanceUID}"
              f"/instances/{sr.SOPInstanceUID}")
    return PacsClassification(result, instance, str(sr.SOPInstanceUID), sr_url)


def read_stored_sr(pacs: DICOMwebClient, url: str, *, study: str, sr_instance: str) -> SrContent:
    """Retrieve a stored SR from the PACS (QIDO-RS, then WADO-RS) and read it (:func:`clients.sr.read_sr`)."""
    found = pacs.search_for_instances(study_instance_uid=study, search_filters={"SOPInstanceUID": sr_instance},
                                      fields=["0020000E"])
    if not found:
        raise DataError(None, f"PACS {url}: no SR {sr_instance} in study {study}")
    series = str(found[0]["0020000E"]["Value"][0])
    return read_sr(pacs.retrieve_instance(study, series, sr_instance))


@dataclass(frozen=True)
class PacsDemoSummary:
    """What the PACS demo did, for ``pacs-demo.json`` and the table it prints."""

    dicomweb: str
    uploaded: int
    trained_from_pacs: int
    model_sha256: str
    test_macro_auc: float
    classified: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _labels_by_uid(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["sop_instance_uid"]: r["label"] for r in csv.DictReader(fh)}


def run_pacs_demo(data: Path, out: Path, *, model: Path | None = None, epochs: int = DEMO_EPOCHS,
                  instances: int = DEMO_INSTANCES, arch: ArchConfig | None = None,
                  say: Callable[[str], None] = log.info) -> PacsDemoSummary:
    """The PACS story on a phantom hospital (``data``: site-1/, test/, optionally public/), end to end.

    Orthanc in ``out/pacs`` receives site-1 and test/; the hospital pulls them into its cache and
    trains (or takes ``model``); the model is compiled, served on loopback and ``instances`` test
    slices are classified on ciphertext, each result stored in the PACS as an SR and read back.
    """
    start = time.perf_counter()
    with OrthancServer(OrthancConfig(out / "pacs")) as server:
        url = server.cfg.dicomweb
        pacs = connect(url, auth=server.auth)
        say(f"PACS (Orthanc + DICOMweb) at {url}; storing the phantom hospital …")
        uploaded = sum(upload_folder(data / part, url, out / f"labels-{part}.csv", client=pacs)
                       for part in ("site-1", "test"))
        train_cache, test_cache = out / "cache" / "site-1", out / "cache" / "test"
        pulled = sync(PacsSource(url, out / "labels-site-1.csv"), train_cache, client=pacs)
        sync(PacsSource(url, out / "labels-test.csv"), test_cache, client=pacs)
        if model is None:
            say(f"training from the PACS cache ({epochs} epochs) …")
            result = train_centralised(train_cache, test=test_cache, out=out / "model",
                                       arch=arch or ArchConfig(head=HeadKind.FLATTEN),
                                       train=TrainConfig(epochs=epochs))
            model, auc = result.model_path, result.metrics.auc_macro
        else:
            auc = float(load_checkpoint(model).meta.get("metrics", {}).get("auc_macro", float("nan")))
        ckpt = load_checkpoint(model)
        calib = (load_calibration(data / "public", meta=ckpt.meta, n=CALIBRATION_IMAGES)
                 if (data / "public").is_dir() else None)  # public images only: model.he goes to the server
        he = out / "model.he"
        compile_checkpoint(model, checkpoint=ckpt, calibration=calib).compiled.save(he)
        tokens = out / "tokens.json"
        tokens.unlink(missing_ok=True)
        token = TokenStore.add(tokens, "pacs-hospital")
        proc, service_url = start_service(he, tokens=tokens)
        truth = _labels_by_uid(out / "labels-test.csv")
        picked = sorted(truth)[:instances]
        classified: list[dict[str, Any]] = []
        try:
            with ServiceClient(service_url, out / "keys", token=token) as client:
                for uid in picked:
                    study = str(pydicom.dcmread(test_cache / f"{uid}.dcm", stop_before_pixels=True).StudyInstanceUID)
                    done = classify_pacs_instance(client, pacs, url, study=study, series="", instance=uid,
                                                  cache=out / "cache" / "classify", expect_sha256=ckpt.sha256)
                    back = read_stored_sr(pacs, url, study=study, sr_instance=done.sr_sop_instance_uid)
                    say(f"{uid}: {done.classification.prediction.label} (true {truth[uid]}); SR at {done.sr_url}")
                    classified.append({**done.to_dict(), "true_label": truth[uid], "sr_finding": back.finding,
                                       "sr_probabilities": back.probabilities,
                                       "sr_source": back.source_sop_instance_uid, "sr_parameters": back.parameters})
        finally:
            stop_child(proc, grace_s=60)
    summary = PacsDemoSummary(url, uploaded, pulled.instances, ckpt.sha256, auc, classified,
                              time.perf_counter() - start)
    atomic_write_json(out / "pacs-demo.json", summary.to_dict())
    return summary

