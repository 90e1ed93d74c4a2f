"""The initial global model: checkpoint, public pretraining, or random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from aggregator.initial import InitKind, initial_model
from federation.config import RunConfig
from federation.errors import DataError, ModelError
from federation.ingest import Preprocess, load_dataset
from federation.model import build_model
from federation.storage import save_checkpoint
from simulations.phantoms import PhantomConfig, generate_phantoms


@pytest.fixture(scope="module")
def with_public(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pub")
    generate_phantoms(out, config=PhantomConfig(sites=2, per_site=6, test=6, size=16, seed=7, public=24))
    return out


def _loss(model: nn.Module, data: Path) -> float:
    ds = load_dataset(data, preprocess=Preprocess(size=16))
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(ds.images), ds.labels))


def test_the_server_pretrains_on_the_public_archive_and_says_so(with_public: Path) -> None:
    cfg = RunConfig(data_dir=str(with_public), image_size=16, batch_size=256, pretrain_batch_size=8,
                    pretrain_epochs=5)

    init = initial_model(cfg)

    assert init.kind is InitKind.PUBLIC_PRETRAINED
    assert init.info["public_images"] == 24
    assert init.info["public_dir"] == str(with_public / "public")
    assert init.info["batch_size"] == 8  # its own batch, not the sites' DP-SGD batch
    assert _loss(init.model, with_public / "public") < _loss(build_model(cfg.arch(), seed=cfg.seed),
                                                             with_public / "public")


def test_without_public_data_or_with_zero_epochs_training_starts_from_the_seeded_random_model(
        tiny_federation: Path, with_public: Path) -> None:
    for data, epochs in ((tiny_federation, 15), (with_public, 0)):
        cfg = RunConfig(data_dir=str(data), image_size=16, pretrain_epochs=epochs, seed=4)

        init = initial_model(cfg)

        assert init.kind is InitKind.RANDOM
        reference = build_model(cfg.arch(), seed=4).state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in init.model.state_dict().items())


def test_a_given_checkpoint_is_used_and_a_mismatched_one_is_refused(tmp_path: Path) -> None:
    cfg = RunConfig(image_size=16, head="flatten")
    model = build_model(cfg.arch(), seed=11)
    save_checkpoint(tmp_path / "m.pt", model, meta={})
    other = build_model(RunConfig(image_size=16, head="gap").arch())
    save_checkpoint(tmp_path / "gap.pt", other, meta={})

    init = initial_model(RunConfig(image_size=16, initial_model=str(tmp_path / "m.pt")))

    assert init.kind is InitKind.CHECKPOINT
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in init.model.state_dict().items())
    with pytest.raises(ModelError, match=r"gap\.pt: architecture .* differs from the run's"):
        initial_model(RunConfig(image_size=16, initial_model=str(tmp_path / "gap.pt")))


def test_a_missing_public_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="public-dir"):
        initial_model(RunConfig(image_size=16, public_dir=str(tmp_path / "nope")))
