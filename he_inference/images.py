"""Images for the model, read as in training (:mod:`federation.ingest`): one file, or a labelled folder.

A checkpoint's ``meta`` holds its class names and its :class:`~federation.ingest.Preprocess`
fields; the compiled model's ``meta["preprocess"]`` carries the latter to the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from federation.errors import DataError
from federation.ingest import Preprocess, load_dataset, read_slice
from he_inference.passes.ir import Array

__all__ = ["LabelledImages", "load_images", "read_image"]


def read_image(path: Path, preprocess: Mapping[str, Any]) -> Array:
    """One image for the model: a DICOM slice (windowed and resized as in training) or a ``.npy`` (C, H, W).

    Raises
    ------
    DataError
        The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist")
    if path.suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    return np.asarray(read_slice(path, Preprocess(**preprocess)).numpy(), dtype=np.float64)


@dataclass(frozen=True)
class LabelledImages:
    """Images (N, C, H, W) in [0, 1], float64, and their class indices (N,)."""

    images: Array
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.labels) != len(self.images):
            raise ValueError(f"`images` must be (N, C, H, W) with one entry of `labels` each, got "
                             f"{self.images.shape} and {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.images)


def load_images(folder: Path, *, meta: Mapping[str, Any]) -> LabelledImages:
    """Every image of a labelled folder, with the classes and preprocessing of a checkpoint's ``meta``."""
    data = load_dataset(folder, classes=meta["classes"], preprocess=Preprocess(**meta.get("preprocess", {})))
    return LabelledImages(data.images.double().numpy(), data.labels.numpy().astype(np.int64))
