"""The ground every package stands on: shared types and helpers, no engine.

Modules, bottom up: :mod:`~federation.errors` (the error tree), :mod:`~federation.model`
(the Approx-CNN / Ref-CNN family and its weights), :mod:`~federation.config` (the run
config and its strict flat-key parser), :mod:`~federation.ingest` (DICOM / PNG / NPZ to
tensors, the ``site-K`` layout), :mod:`~federation.train` (the plain training loop),
:mod:`~federation.metrics`, :mod:`~federation.storage` (atomic writes, checkpoints),
:mod:`~federation.plots`, :mod:`~federation.pki` (deployment certificates) and
:mod:`~federation.console`. Nothing here imports Flower, Opacus or SEAL (import-linter
checks it), so every layer above can use it.
"""

from federation.config import RunConfig
from federation.errors import PrivradError
from federation.ingest import ImageSet, Preprocess, load_dataset
from federation.model import CLASSES, ArchConfig, ModelKind, build_model
from federation.train import TrainConfig, train_epochs

__all__ = [
    "CLASSES",
    "ArchConfig",
    "ImageSet",
    "ModelKind",
    "Preprocess",
    "PrivradError",
    "RunConfig",
    "TrainConfig",
    "build_model",
    "load_dataset",
    "train_epochs",
]
