"""Choices on the validation split: each choice picks its best candidate by validation AUC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.errors import DataError
from simulations.phantoms import PhantomConfig, generate_phantoms
from simulations.selection import CHOICES, REF_LRS, run_selection


def test_each_choice_picks_the_candidate_best_on_the_validation_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_phantoms(data, config=PhantomConfig(sites=2, per_site=12, test=9, val=9, size=16, seed=3))

    trained: list[str] = []
    summary = run_selection(data, tmp_path / "sel", epochs=1, federated=False, size=16,
                            on_candidate=lambda name, _auc: trained.append(name))

    rows = summary["rows"]
    assert len(rows) == sum(len(values) for _, values, _ in CHOICES) + len(REF_LRS)
    assert len(trained) == len(set(trained)) < len(rows)  # a setting met twice (the incumbent) is trained once
    for choice in {r["choice"] for r in rows}:
        group = [r for r in rows if r["choice"] == choice]
        chosen = [r for r in group if r["chosen"]]
        assert len(chosen) == 1
        assert chosen[0]["val_auc_macro"] == max(r["val_auc_macro"] for r in group)
        assert sum(r["default"] for r in group) == 1
    # each choice was made around the ones before it
    assert summary["chosen"]["approx-head"] in {"gap", "flatten"}
    saved = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert saved["rows"] == rows
    assert "| choice | candidate |" in (tmp_path / "sel" / "selection.md").read_text()


def test_without_a_validation_split_there_is_nothing_to_choose_on(tiny_federation: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="choices are made on the validation split"):
        run_selection(tiny_federation, tmp_path, epochs=1, federated=False)
