"""One hospital: data ingestion, local training, the Flower ClientApp."""

from clients.ingest import ImageSet, Preprocess, load_dataset
from clients.train import TrainConfig, evaluate, train_epochs

__all__ = ["ImageSet", "Preprocess", "TrainConfig", "evaluate", "load_dataset", "train_epochs"]
