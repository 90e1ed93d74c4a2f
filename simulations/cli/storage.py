"""``privrad vault``: protected image storage at a site (keygen, put, get, list, rotate-key)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich import box
from rich.table import Table

from federation.console import console, out_console, progress_bar
from federation.errors import DataError, VaultError
from federation.ingest import read_dicom
from federation.storage import atomic_write_bytes
from privacy.keyed import BlockKey
from privacy.vault import Keyring, get_object, list_objects, put_file, rotate_key
from simulations.audits import measure_leakage
from simulations.keyed_tier import TIER_MODELS, train_tier

vault_app = typer.Typer(help="Images at rest: de-identified, JPEG 2000 lossless, sealed with AES-256-GCM per site.",
                        no_args_is_help=True)

VaultOpt = Annotated[Path, typer.Option(help="Vault folder (objects/ holds one sealed file per slice).")]
KeyringOpt = Annotated[Path, typer.Option(help="The site's keyring file (mode 600; keep it at the site).")]


@vault_app.command("keygen")
def keygen(keyring: KeyringOpt, site: Annotated[str, typer.Option(help="Site name the keyring belongs to.")]) -> None:
    """Create a site keyring with one fresh AES-256 key (refuses to overwrite)."""
    ring = Keyring.create(keyring, site=site)
    out_console.print(f"{keyring}: keyring of {site}, active key {ring.active} (mode 600)")


@vault_app.command("put")
def put(
    vault: VaultOpt,
    keyring: KeyringOpt,
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched for *.dcm).")],
    verify: Annotated[bool, typer.Option(help="Open each object again and compare its pixels with the source "
                                              "file's, bit for bit.")] = True,
    allow_burned_in: Annotated[bool, typer.Option(help="Seal slices whose pixels may show text (Burned In "
                                                       "Annotation YES, or absent on a derived or secondary "
                                                       "capture image) flagged, without the de-identification "
                                                       "claim, instead of refusing them.")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Leave out files that cannot be sealed (listed with the reason) "
                                                "instead of stopping at the first.")] = False,
) -> None:
    """De-identify, compress losslessly and seal DICOM slices; print each object's id and source pseudonym.

    Source paths appear only in messages about a file that cannot be sealed (they are the
    ones typed on this command line); the vault and this command's results hold the
    keyed pseudonym instead.
    """
    ring = Keyring.load(keyring)
    files = [f for p in paths for f in (sorted(p.rglob("*.dcm")) if p.is_dir() else [p])]
    if not files:
        raise typer.BadParameter(f"no DICOM files under {', '.join(map(str, paths))}")
    original = sealed = flagged = 0
    skipped: list[DataError] = []
    with progress_bar() as bar:
        task = bar.add_task("seal", total=len(files))
        for f in files:
            try:
                info = put_file(vault, f, ring, allow_burned_in=allow_burned_in)
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append(err)
                bar.advance(task)
                continue
            original += info.original_bytes
            sealed += info.sealed_bytes
            flagged += not info.profile
            if verify:
                back, _ = get_object(vault, info.object_id, ring)
                source = read_dicom(f).pixel_array
                if back.pixel_array.dtype != source.dtype or not np.array_equal(back.pixel_array, source):
                    raise VaultError(f"{f}: the sealed object {info.object_id} does not give back its pixels")
            out_console.print(f"{info.object_id}  {info.pseudonym}"
                              + ("" if info.profile else f"  NOT de-identified: burned-in {info.burned_in}"))
            bar.advance(task)
    for bad in skipped:
        console.print(f"[yellow]skipped[/yellow] {bad}")
    count = len(files) - len(skipped)
    if not count:
        raise DataError(None, f"no slice sealed: {len(skipped)} files skipped")
    out_console.print(f"sealed {count} slices for {ring.site}: {original:,} bytes of DICOM → {sealed:,} bytes "
                      f"sealed ({sealed / original:.1%} of the original, {sealed / original - 1:+.1%})"
                      + ("; every slice read back bit-exact" if verify else "")
                      + (f"; {flagged} flagged: pixels may show text, no de-identification claim" if flagged else "")
                      + (f"; {len(skipped)} files skipped" if skipped else ""))


@vault_app.command("get")
def get(
    vault: VaultOpt,
    keyring: KeyringOpt,
    object_id: Annotated[str, typer.Argument(help="Object id: 32 lowercase hex digits (see `privrad vault list`).")],
    out: Annotated[Path, typer.Option(help="DICOM file to write.")],
    uncompressed: Annotated[bool, typer.Option(help="Write Explicit VR Little Endian instead of JPEG 2000.")] = False,
) -> None:
    """Open one object (bound to its id, authenticated, pixels verified) and write it as a DICOM file."""
    ds, meta = get_object(vault, object_id, Keyring.load(keyring))
    if uncompressed:
        ds.decompress()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(out, buf.getvalue())
    claim = "de-identified" if ds.PatientIdentityRemoved == "YES" else "NOT de-identified (burned-in text possible)"
    out_console.print(f"{out}: object {object_id}, {ds.Rows}×{ds.Columns} slice, source {meta['pseudonym']}, "
                      f"{claim}, pixel hash verified")


@vault_app.command("list")
def list_(vault: VaultOpt) -> None:
    """Object headers: id, source pseudonym, de-identified or not, size; sites and keys (no key needed)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("object", no_wrap=True, min_width=32)  # whole ids and pseudonyms, in 80 columns too
    table.add_column("source", no_wrap=True, min_width=20)
    table.add_column("de-id.")
    table.add_column("sealed B", justify="right")
    n = original = sealed = 0
    sites: dict[str, int] = {}
    keys: dict[str, int] = {}
    flagged: dict[str, int] = {}
    for info in list_objects(vault):
        table.add_row(info.object_id, info.pseudonym, "yes" if info.profile else "NO", f"{info.sealed_bytes:,}")
        n, original, sealed = n + 1, original + info.original_bytes, sealed + info.sealed_bytes
        sites[info.site] = sites.get(info.site, 0) + 1
        keys[info.key_id] = keys.get(info.key_id, 0) + 1
        if not info.profile:
            flagged[info.burned_in] = flagged.get(info.burned_in, 0) + 1
    out_console.print(table)
    if n:
        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))

        out_console.print(f"{n} objects (sites: {counts(sites)}; keys: {counts(keys)}), {sealed:,} bytes sealed for "
                          f"{original:,} bytes of DICOM ({sealed / original:.1%})")
        if flagged:
            out_console.print(f"{sum(flagged.values())} NOT de-identified, their pixels may show text (burned-in "
                              f"annotation: {counts(flagged)}); sealed with --allow-burned-in")


@vault_app.command("rotate-key")
def rotate(vault: VaultOpt, keyring: KeyringOpt) -> None:
    """Re-seal every object of the keyring's site under a new key, then retire the old one (resumable)."""
    ring = Keyring.load(keyring)
    total = sum(1 for i in list_objects(vault) if i.site == ring.site)
    with progress_bar() as bar:
        task = bar.add_task("re-seal", total=total)
        count = rotate_key(vault, ring, progress=lambda n: bar.advance(task, n))
    out_console.print(f"re-sealed {count} objects of {ring.site} under key {ring.active}; old keys removed")


keyed_app = typer.Typer(help="Keyed block-transform tier: a secret in-block pixel shuffle + NP flips, plaintext speed.",
                        no_args_is_help=True)


@keyed_app.command("keygen")
def keyed_keygen(
    key: Annotated[Path, typer.Option(help="Key file to write (mode 600; stays at the hospital).")],
    block: Annotated[int, typer.Option(help="Block side in pixels (the model's block-adaptation size).")] = 4,
) -> None:
    """Draw a fresh block key (permutation and flips) from the OS's CSPRNG."""
    k = BlockKey.generate(block)
    k.save(key)
    out_console.print(f"{key}: block {block}, key id {k.key_id}")


@keyed_app.command("train")
def keyed_train(
    data: Annotated[Path, typer.Option(help="Training data: site-K/ folders (pooled) or one dataset.")],
    key: Annotated[Path, typer.Option(help="Block key file.")],
    out: Annotated[Path, typer.Option(help="Folder for plain.pt, keyed.pt, keyed-learned.pt and tier.json.")],
    test: Annotated[Path | None, typer.Option(help="Held-out set (default DATA/test).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per model.")] = 30,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
) -> None:
    """Train the keyed-transform Approx-CNN beside plain references; print AUC and latency per image."""
    k = BlockKey.load(key)
    with progress_bar() as bar:
        tasks = {name: bar.add_task(f"train {name}", total=epochs) for name in TIER_MODELS}
        result = train_tier(data, test=test or data / "test", key=k, out=out, epochs=epochs, seed=seed, size=size,
                            progress=lambda name, epoch: bar.update(tasks[name], completed=epoch))
    table = Table("model", "input", "block adaptation", "macro-AUC", "latency / image",
                  title=f"keyed tier (block {k.block})")
    for name, m in result.models.items():
        table.add_row(name, "plain" if name == "plain" else "keyed transform", TIER_MODELS[name],
                      f"{m.auc_macro:.3f}", f"{m.latency_s_per_image * 1e3:.2f} ms")
    out_console.print(table)
    fit, attack = result.adaptation_fit, result.single_image_attack
    out_console.print(f"fit on {fit.images} transformed slices ({fit.seconds:.1f} s): "
                      f"{fit.positions_correct}/{k.block ** 2} positions and {fit.flips_correct}/{k.block ** 2} "
                      f"flips of the key. Attack: {attack.whole_key_recovered} of {attack.slices} single "
                      "transformed test slices give away the whole key.")
    out_console.print(f"wrote {out}/tier.json and the three models")


def leakage(
    test: Annotated[Path, typer.Option(help="A labelled DICOM folder (e.g. DATA/test).")],
    model: Annotated[Path, typer.Option(help="The model whose HE packing the CKKS upload uses (model.pt).")],
    key: Annotated[Path, typer.Option(help="Block key of the keyed tier.")],
    out: Annotated[Path, typer.Option(help="Folder for leakage.json and leakage.png.")],
    n: Annotated[int, typer.Option(help="Slices to measure.")] = 200,
) -> None:
    """SSIM, PSNR and perceptual-hash distance between slices and what an attacker holds, per tier."""
    with progress_bar() as bar:
        task = bar.add_task("measure", total=n)
        result = measure_leakage(test, model_path=model, key=BlockKey.load(key), out=out, n=n,
                                 progress=lambda k: bar.advance(task, k))
    table = Table("attacker holds", "SSIM mean (max)", "PSNR dB mean", "pHash distance mean (min)",
                  title=f"leakage over {result['slices']} slices")
    for tier, m in result["tiers"].items():
        table.add_row(tier, f"{m['ssim']['mean']:.4f} ({m['ssim']['max']:.4f})", f"{m['psnr']['mean']:.1f}",
                      f"{m['phash']['mean']:.1f} ({m['phash']['min']:.0f})")
    out_console.print(table)
    recovered = result["keyed"]["single_slice_key_recovered"]
    out_console.print(f"keyed-attacked: the whole key was recovered from {recovered} of {result['slices']} single "
                      "transformed slices, without the key or labels")
    out_console.print(f"wrote {out}/leakage.json and {out}/leakage.png")
