"""Local training and evaluation of one model on one image set (no Flower imports)."""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from federation.errors import ConfigError
from federation.ingest import ImageSet
from federation.metrics import ClassificationMetrics, classification_metrics
from federation.model import ModelKind, PrivradCNN

__all__ = [
    "EpochStats",
    "ProximalTerm",
    "TrainConfig",
    "augment_batch",
    "default_lr",
    "evaluate",
    "make_optimizer",
    "predict_proba",
    "train_epochs",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for local (non-private) training.

    Parameters
    ----------
    epochs
        Passes over the data.
    batch_size
        Images per step.
    lr
        AdamW learning rate, cosine-decayed to zero over the run. Defaults per model
        (:func:`default_lr`), chosen on the validation split (``privrad select``).
    weight_decay
        AdamW decoupled weight decay.
    augment
        Random left-right flips (anatomy is close to symmetric).
    seed
        Seed of the shuffling and augmentation.
    optimizer
        ``adamw`` or ``sgd`` (with ``momentum``); DP-SGD usually prefers ``sgd``.
    momentum
        SGD momentum.
    schedule
        ``cosine`` (decay to zero over the run) or ``constant`` (federated rounds).
    shift
        With ``augment``: also a random translation of up to ``shift`` pixels (reflect-padded).
    aug_mult
        DP-SGD only: augmentation multiplicity (De et al. 2022): each sampled image is
        augmented ``aug_mult`` times and its per-sample gradient is the mean over the copies,
        clipped once, so the privacy cost is unchanged.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    shift: int = 0
    aug_mult: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"`epochs` must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"`lr` must be positive, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"`optimizer` must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.shift < 0:
            raise ConfigError(f"`shift` must not be negative, got {self.shift}")
        if self.aug_mult < 1:
            raise ConfigError(f"`aug_mult` must be at least 1, got {self.aug_mult}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"`schedule` must be 'cosine' or 'constant', got {self.schedule!r}")


def default_lr(kind: ModelKind) -> float:
    """Learning rate chosen for each model on the validation split (``privrad select``).

    Flatten head, 30 epochs, val macro-AUC: Approx-CNN 0.986 at 3e-3 vs 0.978 at 1e-3;
    Ref-CNN 0.997 at 3e-3 vs 0.995 at 1e-3.
    """
    return 3e-3


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did."""

    epoch: int
    loss: float
    seconds: float


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and learning-rate schedule ``config`` asks for."""
    opt: torch.optim.Optimizer
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    return opt, sched


class ProximalTerm:
    """FedProx's ``mu/2 * ||w - w_global||^2``, anchored at the weights the round started from.

    Its gradient ``mu * (w - w_global)`` depends on no training record, so under DP-SGD it
    is added after clipping and noise (:meth:`add_grad`) and costs no privacy budget.
    """

    def __init__(self, model: nn.Module, mu: float) -> None:
        if not mu > 0:
            raise ConfigError(f"`proximal_mu` must be positive, got {mu}")
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]
        self.params = list(model.parameters())

    def add_grad(self) -> None:
        """Add ``mu * (w - w_global)`` to every trainable parameter's ``.grad``."""
        with torch.no_grad():
            for p, a in zip(self.params, self.anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - a, alpha=self.mu)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of the batch mirrored left-right with probability 1/2 (draws from ``gen``)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_shift(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Each image translated by up to ``shift`` pixels in each direction (reflect padding; draws from ``gen``)."""
    if shift <= 0 or not len(x):
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def augment_batch(x: torch.Tensor, gen: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The configured augmentation: a random flip, then (``shift`` > 0) a random translation."""
    return random_shift(random_flip(x, gen), gen, config.shift)


FEATURE_CACHE_BYTES = 4 * 2**30
"""Front-end features one process keeps (81 × 16 × 16 floats, 83 KB, per 64×64 slice at J = 2)."""


class FeatureCache:
    """Fixed front-end features per image tensor, while the tensor lives and is unchanged; LRU beyond ``limit`` bytes.

    A scattering front end has no weights, so a slice's features are the same in every
    epoch and round: computing them once per site turns each later epoch into training
    a classifier on 20,736 numbers per slice. The key holds the tensor's identity and
    version counter (an in-place change misses) and the front end's ``(size, J, L)``;
    an entry goes when its tensor is collected. Nothing here leaves the process.
    """

    def __init__(self, limit: int = FEATURE_CACHE_BYTES) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[int, int, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: tuple[int, int, tuple[int, ...]]) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()

    def get(self, front: nn.Module, spec: tuple[int, ...], images: torch.Tensor) -> torch.Tensor:
        """``front(images)`` without gradients, computed once while ``images`` is cached.

        No mode switch: the front end has no layer that behaves differently in training.
        """
        key = (id(images), images._version, spec)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        with torch.no_grad():
            feats = torch.cat([front(b) for b in _chunks(images, 256)]).contiguous()
        size = feats.element_size() * feats.nelement()
        if size > self.limit:
            return feats
        with self._lock:
            self._items[key] = feats
            self._bytes += size
            while self._bytes > self.limit and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()
        weakref.finalize(images, self._drop, key)
        return feats


_FEATURES = FeatureCache()


def front_features(model: nn.Module, data: ImageSet) -> ImageSet | None:
    """``data`` as ``model``'s fixed front end outputs it (cached), or None if it has none.

    Train or evaluate on it with ``model(x, features=True)``; only without augmentation
    (an augmented copy is a new image).
    """
    feats = _model_features(model, data.images)
    return None if feats is None else replace(data, images=feats)


def training_inputs(model: nn.Module, data: ImageSet, *, augment: bool) -> tuple[ImageSet, bool]:
    """The set a training loop draws batches from, and whether it holds front-end features.

    Cached features for a model with a fixed front end and no augmentation (an augmented
    copy is a new image); ``data`` itself otherwise. Pass the flag on as
    ``model(x, features=flag)`` or ``PerSampleGradients(model, features=flag)``.
    """
    x, on_features = model_inputs(model, data.images, augment=augment)
    return (replace(data, images=x) if on_features else data), on_features


def model_inputs(model: nn.Module, images: torch.Tensor, *, augment: bool = False) -> tuple[torch.Tensor, bool]:
    """:func:`training_inputs` for a tensor.

    The cached features of ``images`` (and True) for a model with a fixed front end and no
    augmentation, else ``images`` itself (and False).
    """
    feats = None if augment else _model_features(model, images)
    return (images, False) if feats is None else (feats, True)


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``x`` in slices of ``size`` rows.

    An empty ``x`` gives one empty slice, so that ``torch.cat`` of what a model makes of the
    slices has the right trailing shape.
    """
    return [x[i:i + size] for i in range(0, max(len(x), 1), size)]


def _model_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    if not isinstance(model, PrivradCNN) or not model.config.scatter:
        return None
    cfg = model.config
    return _FEATURES.get(model.front, (cfg.input_size, cfg.scatter, cfg.scatter_angles), images)


def train_epochs(
    model: nn.Module,
    data: ImageSet,
    *,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    proximal_mu: float = 0.0,
) -> list[EpochStats]:
    """Train ``model`` in place with the configured optimiser and cross-entropy.

    Returns one :class:`EpochStats` per epoch; ``on_epoch`` is called after each.
    ``proximal_mu`` > 0 adds FedProx's proximal term around the starting weights.
    """
    prox = ProximalTerm(model, proximal_mu) if proximal_mu else None
    gen = torch.Generator().manual_seed(config.seed)
    data, on_features = training_inputs(model, data, augment=config.augment)
    kw = {"features": True} if on_features else {}
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=config.batch_size,
                        shuffle=True, generator=gen)
    opt, sched = make_optimizer(model, config, config.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()  # again each epoch: an on_epoch callback may have evaluated the model
        start, total, count = time.perf_counter(), 0.0, 0
        for x, y in loader:
            if config.augment:
                x = augment_batch(x, gen, config)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x, **kw), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss became {loss.item()} in epoch {epoch}: lower the learning rate")
            loss.backward()
            if prox is not None:
                prox.add_grad()
            opt.step()
            sched.step()
            total += loss.item() * y.shape[0]
            count += y.shape[0]
        stats = EpochStats(epoch, total / count, time.perf_counter() - start)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> npt.NDArray[np.float64]:
    """Softmax class probabilities, ``(N, num_classes)``.

    A model with a fixed front end reads its cached features of ``images`` (the same logits).
    """
    model.eval()
    x, on_features = model_inputs(model, images)
    kw = {"features": True} if on_features else {}
    out = [torch.softmax(model(b, **kw), dim=1) for b in _chunks(x, batch_size)]
    return torch.cat(out).double().numpy()


def evaluate(model: nn.Module, data: ImageSet) -> ClassificationMetrics:
    """ClassificationMetrics of :func:`federation.metrics.classification_metrics` on ``data``."""
    return classification_metrics(predict_proba(model, data.images), data.labels.numpy(), data.classes)
