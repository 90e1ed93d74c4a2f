"""The initial global model: a given checkpoint, public-data pretraining, or random weights.

DP-SGD from scratch on a few hundred slices per hospital stays at chance level on the
phantom task (measured at ε = 8: macro-AUC 0.49-0.53, centrally pooled 0.52-0.56), so,
as PriMIA started from ImageNet weights, the server may first train on a *public*
archive (``DATA/public``, a stand-in for a public data set such as KiTS19). Those images
are not the hospitals', so pretraining costs no privacy budget; the round-0 evaluation
in ``metrics.json`` shows how much of the final accuracy it already gives.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.config import RunConfig
from federation.errors import DataError, ModelError
from federation.ingest import ImageSet, Preprocess, load_dataset
from federation.metrics import ClassificationMetrics
from federation.model import ModelKind, PrivradCNN, build_model
from federation.storage import load_checkpoint, save_checkpoint
from federation.train import TrainConfig, default_lr, evaluate, train_epochs

__all__ = ["InitKind", "InitialModel", "initial_model", "public_dir", "save_initial_model"]

log = logging.getLogger(__name__)


class InitKind(enum.StrEnum):
    """Where the initial global weights came from."""

    CHECKPOINT = "checkpoint"
    PUBLIC_PRETRAINED = "public-pretrained"
    RANDOM = "random"


@dataclass(frozen=True)
class InitialModel:
    """The initial global model and a JSON-ready account of its provenance."""

    model: PrivradCNN
    kind: InitKind
    info: dict[str, Any]


def public_dir(cfg: RunConfig) -> Path | None:
    """The public archive to pretrain on: ``public-dir``, else ``data-dir/public`` if present.

    Raises
    ------
    DataError
        ``public-dir`` was given but is not a folder.
    """
    if cfg.public_dir:
        path = Path(cfg.public_dir)
        if not path.is_dir():
            raise DataError(path, "`public-dir` is not a folder")
        return path
    default = Path(cfg.data_dir) / "public"
    return default if cfg.data_dir and default.is_dir() else None


def initial_model(cfg: RunConfig) -> InitialModel:
    """Build the run's initial global model (see the module docstring for the order).

    Raises
    ------
    ModelError
        ``initial-model`` has another architecture than the run.
    """
    arch = cfg.arch()
    if cfg.initial_model:
        ckpt = load_checkpoint(Path(cfg.initial_model))
        if ckpt.model.config != arch:
            raise ModelError(f"{cfg.initial_model}: architecture {ckpt.model.config.to_dict()} differs from the "
                             f"run's {arch.to_dict()} (set `head` / `image-size` to match)")
        return InitialModel(ckpt.model, InitKind.CHECKPOINT, {"path": cfg.initial_model, "sha256": ckpt.sha256})
    public = public_dir(cfg) if cfg.pretrain_epochs > 0 else None
    model = build_model(arch, seed=cfg.seed)
    if public is None:
        if cfg.pretrain_epochs > 0:
            log.warning("no public archive (%s/public): the global model starts from random weights", cfg.data_dir)
        return InitialModel(model, InitKind.RANDOM, {"seed": cfg.seed})
    data = load_dataset(public, preprocess=Preprocess(size=cfg.image_size))
    train = TrainConfig(epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, lr=default_lr(ModelKind.APPROX),
                        seed=cfg.seed)
    start = time.perf_counter()
    history = train_epochs(model, data, config=train)
    seconds = time.perf_counter() - start
    log.info("pretrained on %d public images from %s in %.0f s", len(data), public, seconds)
    return InitialModel(model, InitKind.PUBLIC_PRETRAINED, {
        "public_dir": str(public), "public_images": len(data), "public_sha256": data.digest(),
        "epochs": cfg.pretrain_epochs, "batch_size": cfg.pretrain_batch_size, "final_loss": history[-1].loss,
        "seconds": seconds})


def save_initial_model(init: InitialModel, path: Path, test: ImageSet) -> ClassificationMetrics:
    """Evaluate ``init`` on ``test`` and save it as a checkpoint that later runs start from (``initial-model``).

    The checkpoint's metadata holds the classes, where the weights came from, the test
    metrics and the plain-valued part of :attr:`InitialModel.info`.
    """
    metrics = evaluate(init.model, test)
    provenance = {k: v for k, v in init.info.items() if isinstance(v, str | int | float | bool)}
    save_checkpoint(path, init.model, meta={"classes": list(test.classes), "initial": str(init.kind),
                                            "metrics": metrics.to_dict(), **provenance})
    return metrics
