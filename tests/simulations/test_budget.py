"""Privacy-budget sweep on a tiny federation: σ from the target ε, resumption, summaries, report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from federation.errors import ConfigError, DataError
from federation.storage import atomic_write_json
from privacy.inversion import InversionConfig
from simulations.audits import run_inversion_audit
from simulations.budget import (
    AUDIT_VERSION,
    SweepConfig,
    SweepPoint,
    load_sweep,
    parse_epsilons,
    plan,
    run_sweep,
    split_members,
    summarise,
)
from simulations.report import render_report

pytestmark = pytest.mark.slow


def _tiny(data: Path, out: Path, **kw: Any) -> SweepConfig:
    settings: dict[str, Any] = {"epsilons": (1.0, math.inf), "seeds": 1, "rounds": 2, "local_epochs": 1,
                                "pretrain_epochs": 0, "image_size": 32, "batch_size": 4, "holdout": 0.5}
    return SweepConfig(data=str(data), out=str(out), **{**settings, **kw})


@pytest.fixture(scope="module")
def sweep(tiny_federation: Path, tmp_path_factory: pytest.TempPathFactory) -> SweepConfig:
    cfg = _tiny(tiny_federation, tmp_path_factory.mktemp("sweep") / "run")
    run_sweep(cfg)
    return cfg


def _labels(folder: Path) -> set[tuple[str, str]]:
    with (folder / "labels.csv").open(newline="") as fh:
        return {(r["file"], r["label"]) for r in csv.DictReader(fh)}


def test_parse_epsilons() -> None:
    assert parse_epsilons("8, 1,inf,2") == (1.0, 2.0, 8.0, math.inf)
    for bad, msg in (("1,x", "not a number"), ("0,1", "positive"), ("1,1", "repeated")):
        with pytest.raises(ConfigError, match=msg):
            parse_epsilons(bad)


def test_plan_runs_no_dp_first_within_each_seed() -> None:
    cfg = SweepConfig(data="d", out="o", epsilons=(1.0, 8.0, math.inf), seeds=2)
    assert [p.name for p in plan(cfg)] == ["eps-inf-seed-0", "eps-8-seed-0", "eps-1-seed-0",
                                           "eps-inf-seed-1", "eps-8-seed-1", "eps-1-seed-1"]


def test_split_holds_out_a_disjoint_stratified_share_of_each_site(tiny_federation: Path, tmp_path: Path) -> None:
    counts = split_members(tiny_federation, tmp_path, holdout=0.5, seed=0)
    for site in ("site-1", "site-2"):
        train, held = _labels(tmp_path / "data" / site), _labels(tmp_path / "holdout" / site)
        assert not train & held
        assert train | held == _labels(tiny_federation / site)
        assert counts[site] == {"train": len(train), "holdout": len(held)}
        labels = [lab for _, lab in train | held]
        for label in {lab for lab in labels if labels.count(lab) >= 2}:  # every class with 2+ records: both sides
            assert any(lab == label for _, lab in train)
            assert any(lab == label for _, lab in held)
        assert all((tmp_path / "data" / site / f).resolve() == (tiny_federation / site / f).resolve()
                   for f, _ in train)


def test_each_private_point_spends_its_target_epsilon_and_no_more(sweep: SweepConfig) -> None:
    budget = json.loads((sweep.run / "budget.json").read_text())
    assert budget["complete"]
    assert budget["points_finished"] == 2
    row = next(r for r in budget["points"] if r["epsilon"] == "1")
    for per_site in row["epsilon_achieved"]["per_seed"]:
        assert set(per_site) == {"site-1", "site-2"}
        for eps in per_site.values():
            assert eps <= 1.0
            assert eps == pytest.approx(1.0, abs=0.05)  # Opacus's σ search stops within 0.01 of the target
    assert row["delta"] == [1e-5]
    assert row["noise_multiplier"][0] > 0
    inf = next(r for r in budget["points"] if r["epsilon"] == "inf")
    assert "epsilon_achieved" not in inf
    assert set(budget["references"]) == {"federated_nonprivate", "centralised", "initial_model"}


def test_audit_reports_both_attacks_per_epsilon_against_held_out_records(sweep: SweepConfig) -> None:
    audit = json.loads((sweep.run / "audit.json").read_text())
    assert [r["epsilon"] for r in audit["points"]] == ["1", "inf"]
    split = json.loads((sweep.run / "split.json").read_text())
    for row in audit["points"]:
        assert row["members"] == sum(c["train"] for c in split.values())
        assert row["nonmembers"] == sum(c["holdout"] for c in split.values())
        assert set(row["attacks"]) == {"loss", "calibrated"}
        n1, n0 = row["members"], row["nonmembers"]
        assert row["chance_auc_sd"] == pytest.approx(math.sqrt((n1 + n0 + 1) / (12 * n1 * n0)))
        assert 0 <= row["attacks"]["loss"]["auc"]["mean"] <= 1
    assert audit["points"][0]["dp_bound_tpr_at_fpr"]["0.01"] == pytest.approx(math.e * 0.01 + 1e-5)
    for png in ("budget.png", "audit.png"):
        assert (sweep.run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_sweep_resumes_from_its_finished_points(sweep: SweepConfig) -> None:
    done = sweep.run / "points" / "eps-inf-seed-0" / "point.json"
    before = done.stat().st_mtime_ns
    broken = sweep.run / "points" / "eps-1-seed-0"
    (broken / "point.json").unlink()  # as if the process died before the point finished
    (broken / "ledgers" / "stale-marker").write_text("left by the dead run")
    calls: list[tuple[str, bool]] = []

    def on_point(point: SweepPoint, result: dict[str, Any] | None) -> None:
        calls.append((point.name, result is not None))

    budget = run_sweep(sweep, on_point=on_point)
    assert calls == [("eps-inf-seed-0", True), ("eps-1-seed-0", False), ("eps-1-seed-0", True)]
    assert done.stat().st_mtime_ns == before  # the finished point was not run again
    assert not (broken / "ledgers" / "stale-marker").exists()  # the interrupted one started over
    assert budget.complete
    assert budget.points_finished == budget.points_planned == len(budget.points) * sweep.seeds
    assert summarise(json.loads((sweep.run / "budget.json").read_text()),
                     json.loads((sweep.run / "audit.json").read_text())) == budget
    eps = json.loads((broken / "point.json").read_text())["epsilon"]
    assert max(eps.values()) <= 1.0  # a fresh ledger: the rerun did not stack on the dead run's spend


def test_points_audited_by_another_audit_version_are_reaudited_without_retraining(sweep: SweepConfig) -> None:
    point = sweep.run / "points" / "eps-inf-seed-0"
    stale = json.loads((point / "point.json").read_text())
    trained = (point / "global_model.pt").stat().st_mtime_ns
    atomic_write_json(point / "point.json", {**stale, "audit_version": 0, "membership": {}})
    run_sweep(sweep)
    fresh = json.loads((point / "point.json").read_text())
    assert fresh["audit_version"] == AUDIT_VERSION
    assert fresh["membership"] == stale["membership"]  # same models, same records: the same audit
    assert (point / "global_model.pt").stat().st_mtime_ns == trained


def test_a_folder_of_another_sweep_is_refused(sweep: SweepConfig, tiny_federation: Path) -> None:
    other = _tiny(tiny_federation, sweep.run, rounds=3)
    with pytest.raises(ConfigError, match="rounds"):
        run_sweep(other)
    assert load_sweep(sweep.run) == sweep


def test_inversion_audit_and_report(sweep: SweepConfig) -> None:
    out = run_inversion_audit(sweep, batch_sizes=(1, 2), attack=InversionConfig(iterations=20))
    for batch in (1, 2):
        rows = out["results"][str(batch)]
        assert set(rows) == {"plain", "secagg-masked", "secagg-aggregate", "dp-eps-1"}
        assert rows["secagg-aggregate"]["images_in_update"] == 2 * batch  # two sites
        assert all(0 < r["population_ssim"] <= 1 for r in rows.values())
    assert (sweep.run / "inversion.png").is_file()
    page = render_report(sweep.run).read_text()
    for section in ("Utility versus ε", "Membership inference", "Per-round curves", "Gradient inversion"):
        assert section in page
    assert page.count("data:image/png;base64,") == 4  # budget, audit ROC, per-round curves, inversion
    run_page = render_report(sweep.run / "points" / "eps-1-seed-0", sweep.run / "run.html").read_text()
    assert "privrad federated run" in run_page
    assert "Privacy per site" in run_page


def test_report_refuses_a_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither budget\.json"):
        render_report(tmp_path)
