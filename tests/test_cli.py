"""The privrad CLI end to end on a tiny federation (real files, real training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.errors import ConfigError
from privacy.policy import SitePolicy
from simulations.cli import app

VERBS = ("phantoms", "train", "evaluate", "scan", "simulate", "local", "budget", "invert", "report", "leakage",
         "select", "policy")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(runner: CliRunner, verb: str) -> None:
    result = runner.invoke(app, [verb, "--help"])

    assert result.exit_code == 0, result.output
    assert "--help" in result.output


def test_train_then_evaluate_gives_the_same_metrics(runner: CliRunner, tiny_federation: Path,
                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"

    trained = runner.invoke(app, ["train", "--data", str(tiny_federation), "--model", "approx",
                                  "--epochs", "1", "--size", "32", "--out", str(run)])
    evaluated = runner.invoke(app, ["evaluate", "--model", str(run / "model.pt"),
                                    "--data", str(tiny_federation / "test"), "--out",
                                    str(tmp_path / "eval.json")])

    assert trained.exit_code == 0, trained.output
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval.json").read_text())
    assert {"auc_macro", "auc_per_class", "auprc_per_class", "accuracy"} <= set(metrics)
    assert set(metrics["auc_per_class"]) == {"normal", "cyst", "tumour"}
    assert again["auc_macro"] == pytest.approx(metrics["auc_macro"], abs=1e-9)
    assert metrics["train_images"] == 24


def test_scan_reports_a_bad_file_and_fails(runner: CliRunner, tiny_federation: Path,
                                           tmp_path: Path) -> None:
    data = Path(shutil.copytree(tiny_federation, tmp_path / "data"))
    (data / "site-2" / "site-2_00003.dcm").write_text("broken")

    result = runner.invoke(app, ["scan", "--data", str(data), "--size", "32"])

    assert result.exit_code == 1
    assert "site-2_00003.dcm: is not a DICOM file" in result.output.replace("\n", "")


def test_a_missing_data_folder_is_a_clean_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "simulations.cli.main", "train", "--data",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)

    assert proc.returncode == 2
    assert "nowhere" in proc.stderr
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_policy_init_writes_a_policy_that_show_reads_and_refuses_to_overwrite(runner: CliRunner,
                                                                               tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    first = runner.invoke(app, ["policy", "init", "--out", str(path), "--epsilon-budget", "4", "--allow-no-dp"])
    again = runner.invoke(app, ["policy", "init", "--out", str(path)])
    shown = runner.invoke(app, ["policy", "show", str(path)])

    assert first.exit_code == 0, first.output
    assert SitePolicy.load(path) == SitePolicy(epsilon_budget=4.0, dp_required=False)
    assert again.exit_code != 0
    assert shown.exit_code == 0
    assert "dp-required" in shown.output


def test_simulate_without_dp_needs_sites_whose_policy_allows_it(runner: CliRunner, tiny_federation: Path,
                                                                tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--data", str(tiny_federation), "--out", str(tmp_path / "run"),
                                 "--no-dp", "--size", "32"])

    assert isinstance(result.exception, ConfigError)
    assert "dp-required = true" in str(result.exception)
    assert not (tmp_path / "run" / "metrics.json").exists()
