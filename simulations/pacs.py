"""The PACS story's glue: classify a PACS instance under HE and store the result back as a DICOM SR.

The hospital retrieves the instance from its own PACS into its cache (:func:`clients.pacs.fetch_instance`),
encrypts it and has the service classify the ciphertext (:class:`he_inference.client.ServiceClient`),
decrypts the logits, builds the Structured Report (:func:`clients.sr.classification_sr`) and
stores it in the same PACS (STOW-RS). The service sees ciphertexts only; the SR never leaves the hospital.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from dicomweb_client.api import DICOMwebClient

from clients.pacs import fetch_instance, store
from clients.sr import ModelProvenance, classification_sr
from federation.errors import ConfigError
from he_inference.artifact import MetaKey
from he_inference.client import Classification, ServiceClient

__all__ = ["PacsClassification", "classify_pacs_instance", "provenance_of"]


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
