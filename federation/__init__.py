"""What clients and server agree on: the model family, errors, metrics, checkpoints, the CLI."""

from federation.errors import PrivradError
from federation.model import CLASSES, ArchConfig, ModelKind, build_model

__all__ = ["CLASSES", "ArchConfig", "ModelKind", "PrivradError", "build_model"]
