"""Keyed block transform (exact inverse, key files), its training tier, and the leakage metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.errors import ConfigError, DataError, UnsupportedLayerError
from federation.ingest import Preprocess, load_dataset
from federation.model import INPUT_MEAN, INPUT_STD, ArchConfig, HeadKind, build_model
from he_inference.passes.trace import trace
from privacy.keyed import BlockKey, adapt_to_key, apply_key, invert_key, recover_key
from privacy.leakage import phash_distance, render_bytes
from simulations.audits import measure_leakage
from simulations.cli import app
from simulations.keyed_tier import train_tier


def test_transform_is_a_keyed_block_local_bijection(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, 16, 16), generator=g)
    key = BlockKey.generate(4)
    y = apply_key(x, key)
    torch.testing.assert_close(invert_key(y, key), x)
    assert not torch.allclose(y, x)
    assert not torch.allclose(apply_key(x, BlockKey.generate(4)), y)
    # block-local: each 4×4 block of the output depends only on the same block of the input
    x2 = x.clone()
    x2[:, :, :4, :4] = torch.rand((3, 1, 4, 4), generator=g)
    changed = (apply_key(x2, key) != y).any(dim=(0, 1))
    assert changed[:4, :4].any()
    assert not changed[4:, :].any()
    assert not changed[:, 4:].any()
    key.save(tmp_path / "k.json")
    assert (os.stat(tmp_path / "k.json").st_mode & 0o777) == 0o600
    assert BlockKey.load(tmp_path / "k.json") == key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        key.save(tmp_path / "k.json")
    with pytest.raises(ConfigError, match="multiple of the key's block"):
        apply_key(torch.rand(1, 1, 10, 10), key)
    with pytest.raises(ConfigError, match="permutation"):
        BlockKey(2, (0, 0, 1, 2), (False,) * 4)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ConfigError, match="not a privrad block key"):
        BlockKey.load(tmp_path / "bad.json")


def test_render_and_phash() -> None:
    img = render_bytes(bytes(range(256)) * 20, (8, 8))
    assert img.shape == (8, 8)
    assert img.max() <= 1.0
    with pytest.raises(DataError, match="cannot fill"):
        render_bytes(b"abc", (8, 8))
    yy, xx = np.mgrid[0:32, 0:32]
    a = ((xx - 16) ** 2 + (yy - 12) ** 2 < 60).astype(float)
    assert phash_distance(a, a) == 0
    noise = np.random.default_rng(0).random((32, 32))
    assert phash_distance(a, noise) > 15


@pytest.mark.slow
def test_tier_trains_three_models_and_leakage_separates_encryption_from_transforms(
        tiny_federation: Path, tmp_path: Path) -> None:
    key = BlockKey.generate(4)
    tier = train_tier(tiny_federation, test=tiny_federation / "test", key=key, out=tmp_path, epochs=1, size=32)
    assert set(tier.models) == {"plain", "keyed", "keyed-learned"}
    assert tier.models["keyed"].adapt_block == 4
    assert tier.adaptation_fit.recovered_key  # fitted on the transformed training slices, without the key
    assert tier.single_image_attack.whole_key_recovered == tier.single_image_attack.slices == 9
    # the fitted keyed model is the plain model seen through the key: same start, same training, same scores
    assert tier.models["keyed"].auc_macro == pytest.approx(tier.models["plain"].auc_macro, abs=0.02)
    assert tier.key_id == key.key_id
    assert all(m.latency_s_per_image > 0 for m in tier.models.values())
    assert json.loads((tmp_path / "tier.json").read_text()) == json.loads(json.dumps(tier.to_dict()))
    assert key.key_id in (tmp_path / "tier.json").read_text()
    assert str(key.permutation[:4])[1:-1] not in (tmp_path / "tier.json").read_text()  # the key itself is not

    result = measure_leakage(tiny_federation / "test", model_path=tmp_path / "plain.pt", key=key, out=tmp_path, n=9)
    t = result["tiers"]
    assert result["slices"] == 9
    for tier_name in ("vault", "ckks"):  # pseudorandom bytes: no structure of the slice
        assert abs(t[tier_name]["ssim"]["mean"]) < 0.05
        assert t[tier_name]["phash"]["mean"] > 20
    assert t["other-patient"]["ssim"]["mean"] > 0.2  # unrelated scans of the same anatomy share structure
    assert t["other-patient"]["ssim"]["mean"] > t["vault"]["ssim"]["mean"] + 0.15
    assert result["keyed"]["single_slice_key_recovered"] == 9
    assert t["keyed-attacked"]["ssim"]["min"] > 0.999  # the key recovered from each slice undoes it
    assert (tmp_path / "leakage.png").read_bytes()[:4] == b"\x89PNG"


def test_block_adaptation_can_undo_the_key_exactly_and_he_refuses_it() -> None:
    """The adaptation layer set to the key's inverse makes the keyed model equal the plain one."""
    key = BlockKey.generate(4)
    plain = build_model(ArchConfig(input_size=16, head=HeadKind.FLATTEN), seed=0).eval()
    keyed = build_model(ArchConfig(input_size=16, head=HeadKind.FLATTEN, adapt_block=4), seed=0).eval()
    keyed.load_state_dict({**plain.state_dict(), **{k: v for k, v in keyed.state_dict().items()
                                                    if k.startswith("adapt.")}})
    # Normalised pixel z = (x - m) / s; the key maps x_p -> t_q (q = position of p) with t = x or 1 - x,
    # so z_p = sign * z'_q + flip * (1 - 2m) / s, where z' is the normalised transformed pixel.
    n = 16
    weight, bias = torch.zeros(n, n), torch.zeros(n)
    for q, p in enumerate(key.permutation):
        flip = key.flips[q]
        weight[p, q] = -1.0 if flip else 1.0
        bias[p] = (1 - 2 * INPUT_MEAN) / INPUT_STD if flip else 0.0
    with torch.no_grad():
        keyed.adapt.mix.weight.copy_(weight[:, :, None, None])
        keyed.adapt.mix.bias.copy_(bias)
    x = torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(keyed(apply_key(x, key)), plain(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedLayerError, match="BlockAdapt"):
        trace(keyed)

    # adapt_to_key writes the same inverse and freezes it
    fitted = build_model(ArchConfig(input_size=16, head=HeadKind.FLATTEN, adapt_block=4), seed=5)
    adapt_to_key(fitted, key)
    torch.testing.assert_close(fitted.adapt.mix.weight[:, :, 0, 0], weight)
    torch.testing.assert_close(fitted.adapt.mix.bias, bias)
    assert not any(p.requires_grad for p in fitted.adapt.parameters())
    assert all(p.requires_grad for p in fitted.features.parameters())
    with pytest.raises(ConfigError, match="block adaptation of block 4"):
        adapt_to_key(plain, key)
    with pytest.raises(ConfigError, match="block adaptation of block 2"):
        adapt_to_key(fitted, BlockKey.generate(2))


def test_one_transformed_slice_gives_away_the_key(tiny_federation: Path) -> None:
    """The key-free jigsaw fit recovers permutation and flips exactly from one phantom slice, not from noise."""
    slices = load_dataset(tiny_federation / "test", preprocess=Preprocess(size=32)).images
    for i, block in enumerate((4, 4, 4, 2, 2)):
        key = BlockKey.generate(block)
        guess = recover_key(apply_key(slices[i:i + 1], key), block)
        assert guess == key, (i, block)
        torch.testing.assert_close(invert_key(apply_key(slices[i:i + 1], key), guess), slices[i:i + 1])
    # negative control: without the correlations of an image there is nothing to fit
    noise = torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    key = BlockKey.generate(4)
    guess = recover_key(apply_key(noise, key), 4)
    assert sum(a == b for a, b in zip(guess.permutation, key.permutation, strict=True)) < 8
    with pytest.raises(ConfigError, match="at least two blocks"):
        recover_key(slices[:1, :, :4, :4], 4)
    with pytest.raises(ConfigError, match="expected images"):
        recover_key(slices[0], 4)


def test_keyed_cli_keygen_and_train(tiny_federation: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner


    runner = CliRunner()
    key = str(tmp_path / "block.key")
    assert runner.invoke(app, ["keyed", "keygen", "--key", key]).exit_code == 0
    again = runner.invoke(app, ["keyed", "keygen", "--key", key])
    assert again.exit_code != 0
    assert "refusing to overwrite" in str(again.exception) + again.output
    result = runner.invoke(app, ["keyed", "train", "--data", str(tiny_federation), "--key", key,
                                 "--out", str(tmp_path / "tier"), "--epochs", "1", "--size", "32"])
    assert result.exit_code == 0, result.output
    for name in ("plain", "keyed-learned", "fitted without", "16/16 positions", "9 of 9 single"):
        assert name in result.output, name
    assert json.loads((tmp_path / "tier" / "tier.json").read_text())["adaptation_fit"]["recovered_key"]
