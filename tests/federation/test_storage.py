from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from federation.errors import ModelError
from federation.model import ArchConfig, ModelKind, build_model
from federation.storage import atomic_write_json, load_checkpoint, save_checkpoint


def test_a_checkpoint_round_trips_weights_architecture_and_metadata(tmp_path: Path) -> None:
    model = build_model(ArchConfig(kind=ModelKind.REF, channels=(4, 8), input_size=32), seed=1)
    meta = {"classes": ["a", "b", "c"], "metrics": {"auc_macro": 0.9}}

    sha = save_checkpoint(tmp_path / "m.pt", model, meta=meta)
    ckpt = load_checkpoint(tmp_path / "m.pt")

    assert ckpt.meta == meta
    assert ckpt.sha256 == sha
    assert len(sha) == 64
    assert ckpt.model.config == model.config
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(ckpt.model(x), model.eval()(x))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"not torch")

    with pytest.raises(ModelError, match=r"m\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_foreign_torch_file_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "m.pt")

    with pytest.raises(ModelError, match="not a privrad model checkpoint"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.pt: no such model file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_json_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})

    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})

    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
