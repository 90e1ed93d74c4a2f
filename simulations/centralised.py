"""Centralised (pooled, non-private) training: the upper bound every federated run is compared to."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from federation.errors import DataError
from federation.ingest import ErrorPolicy, ImageSet, Preprocess, concat, load_dataset, site_folders
from federation.metrics import ClassificationMetrics
from federation.model import ArchConfig, build_model
from federation.storage import atomic_write_json, save_checkpoint
from federation.train import EpochStats, TrainConfig, evaluate, train_epochs

__all__ = ["CentralisedResult", "load_training_data", "train_centralised"]

log = logging.getLogger(__name__)


def load_training_data(
    data: Path, *, preprocess: Preprocess, on_error: ErrorPolicy | str = ErrorPolicy.RAISE
) -> ImageSet:
    """All sites of ``data`` pooled, or ``data`` itself when it has no ``site-K`` folders."""
    sites = site_folders(data)
    if not sites:
        return load_dataset(data, preprocess=preprocess, on_error=on_error)
    return concat(load_dataset(s, preprocess=preprocess, on_error=on_error) for s in sites)


@dataclass(frozen=True)
class CentralisedResult:
    """What a centralised run produced."""

    metrics: ClassificationMetrics
    val_auc_macro: float | None
    history: list[EpochStats]
    model_path: Path
    model_sha256: str
    train_images: int
    skipped: int
    seconds: float


def train_centralised(
    data: Path,
    *,
    test: Path,
    out: Path,
    arch: ArchConfig,
    train: TrainConfig,
    on_error: ErrorPolicy | str = ErrorPolicy.RAISE,
    on_epoch: Callable[[EpochStats], None] | None = None,
    val: Path | None = None,
) -> CentralisedResult:
    """Train on all of ``data``, evaluate on ``test`` (and ``val``), write ``out/model.pt`` and ``out/metrics.json``.

    ``val`` (the validation split, for choices) adds ``val_auc_macro`` to the metrics;
    ``test`` is for reporting.
    """
    pre = Preprocess(size=arch.input_size)
    start = time.perf_counter()
    train_set = load_training_data(data, preprocess=pre, on_error=on_error)
    test_set = load_dataset(test, preprocess=pre, on_error=on_error)
    if test_set.classes != train_set.classes:
        raise DataError(test, f"has classes {test_set.classes}, training data {train_set.classes}")
    model = build_model(arch, seed=train.seed)
    history = train_epochs(model, train_set, config=train, on_epoch=on_epoch)
    metrics = evaluate(model, test_set)
    val_auc = None if val is None else evaluate(model, load_dataset(val, classes=train_set.classes,
                                                                    preprocess=pre, on_error=on_error)).auc_macro
    record = {**metrics.to_dict(), **({} if val_auc is None else {"val_auc_macro": val_auc})}
    meta = {
        "classes": list(train_set.classes),
        "preprocess": dataclasses.asdict(pre),
        "data_sha256": train_set.digest(),
        "train_images": len(train_set),
        "test_sha256": test_set.digest(),
        "training": {"mode": "centralised", **dataclasses.asdict(train)},
        "metrics": record,
        "privacy": {"dp": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    sha = save_checkpoint(out / "model.pt", model, meta=meta)
    seconds = time.perf_counter() - start
    skipped = len(train_set.skipped) + len(test_set.skipped)
    atomic_write_json(out / "metrics.json", {
        **record,
        "model": str(arch.kind),
        "arch": arch.to_dict(),
        "epochs": [dataclasses.asdict(h) for h in history],
        "train_images": len(train_set),
        "skipped_files": skipped,
        "model_sha256": sha,
        "seconds": seconds,
    })
    return CentralisedResult(metrics, val_auc, history, out / "model.pt", sha, len(train_set), skipped, seconds)
