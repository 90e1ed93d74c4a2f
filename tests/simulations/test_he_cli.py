"""``privrad he`` end to end on a tiny trained-format checkpoint and real DICOM phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from federation.ingest import Preprocess, read_slice
from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import load_checkpoint, save_checkpoint
from he_inference.artifact import CompiledModel
from simulations.cli import app

CLASSES = ["normal", "cyst", "tumour"]
LOGIT_REL_TOL = 1e-3    # HE logits vs PyTorch float32's, relative to the largest logit magnitude
MIN_PRECISION_BITS = 10
AUC_TOL = 0.005         # macro-AUC on HE logits vs on plaintext logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model(ArchConfig(input_size=32, channels=(2, 4), head=HeadKind.FLATTEN), seed=5).eval()
    path = tmp_path_factory.mktemp("he-cli") / "model.pt"
    save_checkpoint(path, model, meta={"classes": CLASSES, "preprocess": {"size": 32}})
    return path


def test_compile_keygen_encrypt_infer_decrypt_match_the_plaintext_model(checkpoint: Path, tiny_federation: Path,
                                                                        tmp_path: Path) -> None:
    runner = CliRunner()
    he, keys = tmp_path / "m.he", tmp_path / "keys"
    dicom = sorted((tiny_federation / "test").glob("*.dcm"))[0]

    steps = [
        ["he", "compile", "--model", str(checkpoint), "--out", str(he),
         "--private-calibration", str(tiny_federation / "site-1")],
        ["he", "keygen", "--model", str(he), "--out", str(keys)],
        ["he", "encrypt", str(dicom), "--keys", str(keys), "--model", str(he), "--out", str(tmp_path / "x.enc")],
        ["he", "infer", str(tmp_path / "x.enc"), "--model", str(he), "--eval-keys", str(keys / "public.keys"),
         "--out", str(tmp_path / "y.enc"), "--workers", "1"],
        ["he", "decrypt", str(tmp_path / "y.enc"), "--keys", str(keys)],
    ]
    results = [runner.invoke(app, s) for s in steps]
    refused = runner.invoke(app, ["he", "infer", str(tmp_path / "x.enc"), "--model", str(he),
                                  "--eval-keys", str(keys / "secret.key"), "--out", str(tmp_path / "z.enc")])

    for r in results:
        assert r.exit_code == 0, r.output
    assert "model.he will carry the per-layer maximum" in results[0].output  # the private-calibration warning
    assert CompiledModel.load(he).meta["calibration"] == "private: 12 images"
    out = json.loads(results[-1].stdout[results[-1].stdout.index("{"):])
    with torch.no_grad():
        ref = load_checkpoint(checkpoint).model.eval()(read_slice(dicom, Preprocess(size=32))[None])[0]
    got = np.array([out["logits"][c] for c in CLASSES])
    np.testing.assert_allclose(got, ref.double().numpy(), atol=LOGIT_REL_TOL * float(ref.abs().max()), rtol=0)
    assert out["prediction"] == CLASSES[int(ref.argmax())]
    assert isinstance(refused.exception, Exception)
    assert "secret key file" in str(refused.exception)
    assert not (tmp_path / "z.enc").exists()


def test_a_site_folder_given_as_public_calibration_is_refused(checkpoint: Path, tiny_federation: Path,
                                                             tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["he", "compile", "--model", str(checkpoint), "--out", str(tmp_path / "m.he"),
                                      "--calibration", str(tiny_federation / "site-1")])

    assert result.exit_code != 0
    assert "looks like a hospital's own data" in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "m.he").exists()


def test_check_writes_the_report_fields(checkpoint: Path, tiny_federation: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["he", "check", "--model", str(checkpoint), "--data",
                                      str(tiny_federation / "test"), "--n", "3", "--workers", "1",
                                      "--out", str(tmp_path / "check.json")])

    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["n"] == 3
    assert report["argmax_agreement"] == 1.0
    assert report["max_abs_logit_err"] <= LOGIT_REL_TOL * report["max_abs_logit"]
    assert report["precision_bits"] > MIN_PRECISION_BITS
    assert report["upload_bytes"] > 0
    assert report["download_bytes"] > 0
    assert report["eval_key_bytes"] > 0
    assert abs(report["auc_macro_he"] - report["auc_macro_plain"]) <= AUC_TOL
    assert [r["layer"] for r in report["layers"]][-1] == "classifier"
