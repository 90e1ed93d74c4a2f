"""``run_bench`` on a tiny checkpoint: a typed report, per-layer rows and the TenSEAL baseline's ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import save_checkpoint
from he_inference.bench import BenchReport, run_bench

BENCH_REL_TOL = 1e-3   # one encrypted pass vs PyTorch float32, relative to the largest logit


@pytest.mark.slow   # TenSEAL's baseline generates every Galois key at N = 16384
def test_the_bench_report_times_every_layer_and_compares_the_classifier_with_tenseal(tmp_path: Path) -> None:
    model = build_model(ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN), seed=9).eval()
    save_checkpoint(tmp_path / "m.pt", model, meta={"classes": ["a", "b", "c"], "preprocess": {"size": 16}})

    report = run_bench(size=16, model_path=tmp_path / "m.pt", runs=1, workers=1)

    assert isinstance(report, BenchReport)
    assert [r.layer for r in report.layers][-1] == "classifier"
    assert report.max_abs_logit_err <= BENCH_REL_TOL * report.max_abs_logit
    assert report.tenseal_baseline is not None
    assert report.tenseal_baseline.first_conv_act_s is None   # no patchify stem: not expressible in TenSEAL
    assert report.ratio_classifier is not None
    assert report.ratio_classifier > 0
    summary = json.loads(json.dumps(report.summary()))
    assert "layers" not in summary
    assert "first_conv_act_s" not in summary["tenseal_baseline"]
    assert "ratio_first_conv_act" not in summary
