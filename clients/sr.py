"""The classification as a DICOM Structured Report, so a PACS viewer shows it beside the study.

A TID 1500 Measurement Report (Comprehensive 3D SR) built with `highdicom
<https://highdicom.readthedocs.io>`_, in the source image's study, in a new series:

* one measurement group, for the whole image, whose finding is the predicted class, with the
  source image referenced (SOP Class and Instance UID);
* one measurement per class: its probability (UCUM unit ``1``), from the decrypted logits;
* the algorithm identification: name ``privrad HE-CNN``, the package version, and as parameters
  the model's sha256, the ε (max over sites, at δ) it was trained under, and that the image was
  classified under CKKS encryption.

It is built at the hospital from what the hospital decrypted; the service never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from federation.errors import DataError

__all__ = ["ALGORITHM_NAME", "PRIVRAD_SCHEME", "ModelProvenance", "SrContent", "classification_sr", "read_sr"]

ALGORITHM_NAME = "privrad HE-CNN"
PRIVRAD_SCHEME = "99PRIVRAD"
"""A private coding scheme (DICOM PS3.16 allows ``99``-prefixed ones) for privrad's class names."""
SERIES_NUMBER = 9901
# Type 2 in the patient and study modules (present, possibly empty); highdicom copies them from the evidence
TYPE2_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                       "StudyDate", "StudyTime", "ReferringPhysicianName")


def _class_code(name: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(name.upper()[:16], PRIVRAD_SCHEME, name)


@dataclass(frozen=True)
class ModelProvenance:
    """What the report says about the model: its sha256 and the privacy it was trained under."""

    sha256: str
    epsilon: float | None = None   # max over sites; None: not trained with DP
    delta: float | None = None

    def parameters(self) -> dict[str, str]:
        """Algorithm parameters for the SR (strings, as DICOM wants them)."""
        dp = "not differentially private" if self.epsilon is None else f"{self.epsilon:.3f}"
        out = {"model_sha256": self.sha256, "dp_epsilon": dp, "inference": "CKKS homomorphic encryption"}
        if self.delta is not None:
            out["dp_delta"] = f"{self.delta:g}"
        return out


def _privrad_version() -> str:
    try:
        return version("privrad")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"


def classification_sr(source: Dataset, probabilities: Mapping[str, float], *, provenance: ModelProvenance,
                      manufacturer: str = "privrad") -> Dataset:
    """A Comprehensive 3D SR holding the classification of ``source`` (a CT instance)."""
    if not probabilities:
        raise DataError(None, "a report needs at least one class probability")
    for attr in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not getattr(source, attr, None):
            raise DataError(None, f"the source instance has no {attr}: it cannot be referenced")
    evidence = Dataset()  # the source's header without its pixels; Type 2 attributes a file may lack, empty
    evidence.update({e.tag: e for e in source if e.tag != 0x7FE00010})
    for attr in TYPE2_PATIENT_STUDY:
        if attr not in evidence:
            setattr(evidence, attr, "")
    label = max(probabilities, key=lambda k: probabilities[k])
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=_privrad_version(), family=codes.DCM.ArtificialIntelligence,
        manufacturer=manufacturer, parameters=[f"{k}={v}" for k, v in provenance.parameters().items()])
    measurements = [hd.sr.Measurement(name=hd.sr.CodedConcept(f"P-{name.upper()}"[:16], PRIVRAD_SCHEME,
                                                              f"Probability of {name}"),
                                      value=float(p), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                    for name, p in probabilities.items()]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="privrad classification"),
        finding_type=_class_code(label),
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=ALGORITHM_NAME, manufacturer_name=manufacturer))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
        referenced_images=[evidence],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence], content=report, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=manufacturer, is_complete=True,
        series_description="privrad encrypted classification")
    return sr


@dataclass(frozen=True)
class SrContent:
    """What :func:`read_sr` finds in a privrad report."""

    finding: str
    probabilities: dict[str, float]
    source_sop_instance_uid: str
    parameters: dict[str, str]


def _walk(items: Any) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items or ():
        out.append(item)
        out += _walk(getattr(item, "ContentSequence", None))
    return out


def read_sr(sr: Dataset) -> SrContent:
    """Read back a report written by :func:`classification_sr` (with highdicom's parser)."""
    parsed = sr if isinstance(sr, hd.sr.Comprehensive3DSR) else hd.sr.Comprehensive3DSR.from_dataset(sr)
    content = parsed.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise DataError(None, "the SR is not a TID 1500 measurement report")
    groups = content.get_image_measurement_groups()
    if len(groups) != 1:
        raise DataError(None, f"expected one measurement group in the report, found {len(groups)}")
    group = groups[0]
    finding = group.finding_type
    if finding is None:
        raise DataError(None, "the report's measurement group has no Finding")
    probabilities = {m.name.meaning.removeprefix("Probability of "): float(m.value) for m in group.get_measurements()}
    sources = group.source_images
    params: dict[str, str] = {}
    for item in _walk(list(group)):
        concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if concept is not None and concept.CodeMeaning == "Algorithm Parameters":
            key, _, value = str(item.TextValue).partition("=")
            params[key] = value
    return SrContent(finding=str(finding.meaning), probabilities=probabilities,
                     source_sop_instance_uid=str(sources[0].referenced_sop_instance_uid) if sources else "",
                     parameters=params)
