"""The hospital's PACS as a data source: DICOMweb search (QIDO-RS), retrieval (WADO-RS), upload (STOW-RS).

A PACS holds studies, not a folder with a ``labels.csv``. :func:`sync` copies the CT instances a
labels table names (keyed by SOP Instance UID or by Study Instance UID) into a cache folder at
the site, one file per instance, each written atomically, so an interrupted retrieval leaves
only whole files and a rerun fetches only what is missing. The cache is an ordinary DICOM
folder (``<SOPInstanceUID>.dcm`` and a ``labels.csv``) that :func:`federation.ingest.load_dicom_folder`
reads, so the model sees the same pixels as from files. Nothing leaves the site: retrieval goes
from the hospital's PACS to the hospital's disk.

The DICOMweb client is `dicomweb-client <https://github.com/ImagingDataCommons/dicomweb-client>`_
over a :class:`requests.Session` with a timeout on every call; credentials come from
``PRIVRAD_PACS_USER`` / ``PRIVRAD_PACS_PASSWORD`` (HTTP basic auth), never from the command line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from filelock import FileLock, Timeout
from pydicom.dataset import Dataset

from federation.errors import DataError, PrivradError
from federation.ingest import ErrorPolicy, ImageSet, Preprocess, SkippedFile, load_dicom_folder
from federation.model import CLASSES
from federation.storage import atomic_write_bytes

__all__ = [
    "PACS_PASSWORD_ENV",
    "PACS_USER_ENV",
    "PacsError",
    "PacsSource",
    "SyncReport",
    "connect",
    "fetch_instance",
    "load_pacs",
    "read_uid_labels",
    "skip_counts",
    "store",
    "sync",
    "upload_folder",
]

log = logging.getLogger(__name__)

PACS_USER_ENV = "PRIVRAD_PACS_USER"
PACS_PASSWORD_ENV = "PRIVRAD_PACS_PASSWORD"
SOP_COLUMN = "sop_instance_uid"
STUDY_COLUMN = "study_instance_uid"
LOCK_TIMEOUT_S = 600.0
RETRY_ATTEMPTS = 3
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# the QIDO-RS attributes sync needs: SOP Instance, Study and Series UIDs, Modality
_FIELDS = ("00080018", "0020000D", "0020000E", "00080060")


class PacsError(PrivradError):
    """The PACS cannot be used: unreachable, refusing the credentials, or the connection broke."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"PACS {url}: {problem}")


def _is_uid(value: str) -> bool:
    return len(value) <= 64 and UID_RE.match(value) is not None


def _check_uid(value: str, what: str) -> str:
    if value and not _is_uid(value):
        raise DataError(None, f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


@dataclass(frozen=True)
class PacsSource:
    """Which instances of which PACS, with which labels.

    Parameters
    ----------
    url
        The DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
    labels
        A CSV with columns ``sop_instance_uid,label`` (one row per slice) or
        ``study_instance_uid,label`` (every slice of the study takes its label).
    study, series
        Optional Study / Series Instance UID filters.
    modality
        The modality to train on; other instances (an SR, a localiser of another modality) are
        reported as skipped.
    """

    url: str
    labels: Path
    study: str = ""
    series: str = ""
    modality: str = "CT"

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise DataError(None, f"PACS URL must be http(s)://HOST[:PORT]/PATH, got {self.url!r}")
        _check_uid(self.study, "study filter")
        _check_uid(self.series, "series filter")
        object.__setattr__(self, "labels", Path(self.labels))


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout (requests has no session-wide one)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def connect(url: str, *, timeout: float = 30.0, ca_cert: Path | None = None,
            auth: tuple[str, str] | None = None, headers: Mapping[str, str] | None = None) -> DICOMwebClient:
    """A DICOMweb client for ``url``; basic-auth credentials ``auth``, else from the environment, if set.

    ``headers`` go with every request (e.g. what a hospital's gateway asks for).
    """
    session = _TimeoutSession(timeout)
    session.headers.update(headers or {})
    user, password = auth or (os.environ.get(PACS_USER_ENV, ""), os.environ.get(PACS_PASSWORD_ENV, ""))
    if user:
        session.auth = (user, password)
    if ca_cert is not None:
        session.verify = str(ca_cert)
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    # dicomweb-client retries a failed request (5 attempts, 1 s × 2^k back-off); 3 attempts from 0.25 s
    # ride out a dropped connection without keeping a hospital engineer waiting 30 s on a dead address
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=250)
    return client


def _pacs_call(url: str, what: str, call: Callable[[], Any]) -> Any:
    """Run one DICOMweb call; network and HTTP failures become a :class:`PacsError` naming ``what``."""
    try:
        return call()
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        hint = {401: "refused the credentials (set PRIVRAD_PACS_USER / PRIVRAD_PACS_PASSWORD)",
                403: "forbids this request"}.get(code if isinstance(code, int) else 0, f"answered HTTP {code}")
        raise PacsError(url, f"{what}: {hint}") from exc
    except requests.RequestException as exc:
        raise PacsError(url, f"{what}: unreachable or the connection broke ({type(exc).__name__}: {exc})") from exc


def read_uid_labels(path: Path) -> tuple[str, dict[str, str]]:
    """``(column, {uid: label})`` of a labels table keyed by SOP or Study Instance UID."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "is missing: a PACS source needs a labels table (sop_instance_uid,label or "
                              "study_instance_uid,label)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        names = set(reader.fieldnames or ())
        column = SOP_COLUMN if SOP_COLUMN in names else STUDY_COLUMN if STUDY_COLUMN in names else ""
        if not column or "label" not in names:
            raise DataError(path, f"must have columns '{SOP_COLUMN},label' or '{STUDY_COLUMN},label', "
                                  f"found {reader.fieldnames}")
        table: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            uid, label = (row.get(column) or "").strip(), (row.get("label") or "").strip()
            if not _is_uid(uid):
                raise DataError(path, f"line {line}: {uid!r} is not a DICOM UID")
            if uid in table and table[uid] != label:
                raise DataError(path, f"line {line}: {uid} is labelled both {table[uid]!r} and {label!r}")
            table[uid] = label
    if not table:
        raise DataError(path, "lists no instances")
    return column, table


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync` did: ``fetched`` retrieved now, ``cached`` already there, ``skipped`` with reasons."""

    cache: Path
    fetched: int
    cached: int
    skipped: tuple[SkippedFile, ...] = field(default=())

    @property
    def instances(self) -> int:
        """Instances in the cache's ``labels.csv``."""
        return self.fetched + self.cached


def _value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _search(client: DICOMwebClient, source: PacsSource) -> list[dict[str, Any]]:
    filters = {k: v for k, v in (("StudyInstanceUID", source.study), ("SeriesInstanceUID", source.series)) if v}
    found = _pacs_call(source.url, "searching instances (QIDO-RS)", lambda: client.search_for_instances(
        search_filters=filters, fields=list(_FIELDS), get_remaining=True))
    return list(found or [])


def sync(source: PacsSource, cache: Path, *, client: DICOMwebClient | None = None,
         progress: Callable[[int, int], None] | None = None) -> SyncReport:
    """Copy the labelled CT instances of ``source`` into ``cache``; resumable, one writer at a time.

    ``progress(done, total)`` is called after each instance. Instances of another modality and
    instances the labels table does not name are reported in :attr:`SyncReport.skipped`; a
    selection with no labelled instance of the modality is an error.

    Raises
    ------
    PacsError
        The PACS is unreachable, refuses the credentials, or the connection breaks; the instances
        already cached are whole and kept, and a rerun resumes.
    DataError
        The labels table is unusable, or nothing usable matches the filters.
    """
    column, labels = read_uid_labels(source.labels)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    client = client or connect(source.url)
    where = (f"study {source.study}" if source.study else "the PACS") + (
        f", series {source.series}" if source.series else "")
    try:
        lock = FileLock(str(cache / ".sync.lock"), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout as exc:
        raise DataError(cache, f"is being filled by another sync (lock held for over {LOCK_TIMEOUT_S:.0f} s)"
                        ) from exc
    try:
        found = _search(client, source)
        if not found:
            raise DataError(None, f"{source.url}: {where} holds no instances")
        wanted: list[tuple[str, str, str, str]] = []
        skipped: list[SkippedFile] = []
        modalities: set[str] = set()
        for item in found:
            sop, study, series, modality = (_value(item, t) for t in _FIELDS)
            modalities.add(modality or "?")
            key = sop if column == SOP_COLUMN else study
            if modality != source.modality:
                skipped.append(SkippedFile(Path(sop), f"is a {modality or 'modality-less'} instance, not "
                                                      f"{source.modality}"))
            elif key not in labels:
                skipped.append(SkippedFile(Path(sop), f"is not in the labels table {source.labels}"))
            else:
                wanted.append((sop, study, series, labels[key]))
        if not wanted:
            kinds = ", ".join(sorted(modalities))
            problem = (f"has no {source.modality} instances (found {kinds})"
                       if source.modality not in modalities else
                       f"has no {source.modality} instance that {source.labels} labels")
            raise DataError(None, f"{source.url}: {where} {problem}")
        fetched = cached = 0
        for done, (sop, study, series, _) in enumerate(wanted, start=1):
            if (cache / f"{sop}.dcm").is_file():
                cached += 1
            else:
                _retrieve(client, source.url, study, series, sop, cache, modality=source.modality,
                          what=f"retrieving instance {done} of {len(wanted)} ({sop}); the {done - 1} before it "
                               "are cached, rerun to resume")
                fetched += 1
            if progress is not None:
                progress(done, len(wanted))
        rows = "".join(f"{sop}.dcm,{label}\n" for sop, _, _, label in wanted)
        _write_if_changed(cache / "labels.csv", ("file,label\n" + rows).encode())
        _write_if_changed(cache / "skipped.json", json.dumps(
            [{"instance": str(s.path), "reason": s.reason} for s in skipped], indent=2).encode())
        for reason, count in skip_counts(skipped).items():
            log.warning("PACS %s: %d instances skipped: %s (each named in %s)", source.url, count, reason,
                        cache / "skipped.json")
        return SyncReport(cache, fetched, cached, tuple(skipped))
    finally:
        lock.release()


def skip_counts(skipped: Iterable[SkippedFile]) -> dict[str, int]:
    """How many instances were skipped for each kind of reason (``is a SR instance, not CT``, …)."""
    return dict(Counter(s.reason for s in skipped).most_common())


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write, skipped when the content is the same (the site's dataset cache keys on the mtime)."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def _retrieve(client: DICOMwebClient, url: str, study: str, series: str, sop: str, cache: Path, *,
              modality: str, what: str) -> Path:
    """WADO-RS one instance in its stored transfer syntax; check it; write ``cache/<sop>.dcm`` atomically."""
    ds = _pacs_call(url, what, lambda: client.retrieve_instance(study, series, sop,
                                                                media_types=(("application/dicom", "*"),)))
    got = str(getattr(ds, "SOPInstanceUID", ""))
    if got != sop:
        raise PacsError(url, f"asked for instance {sop}, received {got or 'one without a SOP Instance UID'}")
    if str(getattr(ds, "Modality", "")) != modality:
        raise DataError(None, f"PACS {url}: instance {sop} is a {getattr(ds, 'Modality', 'modality-less')} "
                              f"instance, not {modality}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = cache / f"{sop}.dcm"
    atomic_write_bytes(path, buf.getvalue())
    return path


def fetch_instance(client: DICOMwebClient, url: str, *, study: str, instance: str, cache: Path, series: str = "",
                   modality: str = "CT") -> Path:
    """One instance into ``cache`` (already there: not fetched again); its path.

    Without ``series`` the series is looked up (QIDO-RS). An unknown instance or another
    modality is a :class:`DataError`; network failures a :class:`PacsError`.
    """
    _check_uid(study, "study")
    _check_uid(series, "series")
    _check_uid(instance, "instance")
    if not study or not instance:
        raise DataError(None, "a PACS instance needs its Study and SOP Instance UIDs")
    cache = Path(cache)
    path = cache / f"{instance}.dcm"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    found = _pacs_call(url, f"looking up instance {instance} (QIDO-RS)", lambda: client.search_for_instances(
        study_instance_uid=study, search_filters={"SOPInstanceUID": instance}, fields=list(_FIELDS)))
    if not found:
        raise DataError(None, f"PACS {url}: study {study} holds no instance {instance}")
    _, _, found_series, found_modality = (_value(found[0], t) for t in _FIELDS)
    if series and found_series != series:
        raise DataError(None, f"PACS {url}: instance {instance} is in series {found_series}, not {series}")
    if found_modality != modality:
        raise DataError(None, f"PACS {url}: instance {instance} is a {found_modality or 'modality-less'} "
                              f"instance, not {modality}")
    return _retrieve(client, url, study, found_series, instance, cache, modality=modality,
                     what=f"retrieving instance {instance}")


def load_pacs(source: PacsSource, cache: Path, *, classes: Sequence[str] = CLASSES,
              preprocess: Preprocess | None = None, on_error: ErrorPolicy | str = ErrorPolicy.RAISE,
              client: DICOMwebClient | None = None, progress: Callable[[int, int], None] | None = None
              ) -> ImageSet:
    """:func:`sync`, then load the cache as a DICOM folder; the PACS's skips join the loader's."""
    report = sync(source, cache, client=client, progress=progress)
    data = load_dicom_folder(report.cache, classes=classes, preprocess=preprocess, on_error=on_error)
    return ImageSet(data.images, data.labels, data.classes, data.files, report.skipped + data.skipped)


def store(client: DICOMwebClient, url: str, datasets: Iterable[Dataset], *, batch: int = 32) -> int:
    """STOW-RS ``datasets`` in batches; the count stored."""
    pending: list[Dataset] = []
    count = 0

    def flush() -> None:
        nonlocal count
        if pending:
            _pacs_call(url, f"storing {len(pending)} instances (STOW-RS)", lambda: client.store_instances(pending))
            count += len(pending)
            pending.clear()

    for ds in datasets:
        pending.append(ds)
        if len(pending) >= batch:
            flush()
    flush()
    return count


def upload_folder(folder: Path, url: str, labels_out: Path, *, client: DICOMwebClient | None = None,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Store a DICOM folder (``labels.csv`` + slices) in a PACS; write its labels keyed by SOP Instance UID.

    Returns the number of instances stored. ``labels_out`` (``sop_instance_uid,label``) is what
    :class:`PacsSource` reads back.
    """
    folder = Path(folder)
    table = folder / "labels.csv"
    if not table.is_file():
        raise DataError(table, "is missing: a DICOM folder needs labels.csv with columns file,label")
    with table.open(newline="") as fh:
        rows = [(r["file"], r["label"]) for r in csv.DictReader(fh)]
    client = client or connect(url)
    uids: list[tuple[str, str]] = []

    def datasets() -> Iterable[Dataset]:
        for done, (name, label) in enumerate(rows, start=1):
            try:
                ds = pydicom.dcmread(folder / name)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise DataError(folder / name, f"is not a readable DICOM file ({exc})") from exc
            uids.append((str(ds.SOPInstanceUID), label))
            if progress is not None:
                progress(done, len(rows))
            yield ds

    count = store(client, url, datasets())
    atomic_write_bytes(Path(labels_out), (f"{SOP_COLUMN},label\n" + "".join(f"{u},{lab}\n" for u, lab in uids)
                                          ).encode())
    return count
