"""The ``privrad`` command line: one verb per stage, ``--help`` on each."""

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from federation.config import RunConfig
from federation.console import console, out_console, progress_bar
from federation.errors import ConfigError, PrivradError
from federation.ingest import Preprocess, SkippedFile, load_dataset, site_folders
from federation.metrics import ClassificationMetrics
from federation.model import ArchConfig, HeadKind, ModelKind
from federation.pki import make_certs, make_node_key, read_node_public_key, write_connection
from federation.storage import atomic_write_json, load_checkpoint
from federation.train import EpochStats, TrainConfig, default_lr
from federation.train import evaluate as evaluate_model
from privacy.inversion import InversionConfig
from privacy.policy import SitePolicy
from simulations.audits import run_inversion_audit
from simulations.budget import SweepConfig, SweepPoint, SweepSummary, load_sweep, parse_epsilons, plan, run_sweep
from simulations.centralised import train_centralised
from simulations.children import stop_on_sigterm
from simulations.cli.benchmark import benchmark_app
from simulations.cli.he import he_app
from simulations.cli.pacs import PacsOptions, pacs_app, pull_from_options
from simulations.cli.storage import keyed_app, leakage, vault_app
from simulations.deployment import flower_env, register_supernode
from simulations.federated import run_federated
from simulations.local import run_local
from simulations.phantoms import PhantomConfig, generate_phantoms, public_profile
from simulations.proxy import NginxProxy, ProxyConfig
from simulations.report import render_report
from simulations.selection import run_selection

app = typer.Typer(
    name="privrad",
    help="Privacy-preserving medical imaging AI: federated DP training, CKKS encrypted inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="Destination folder (site-K/ and test/ are written here).")],
    sites: Annotated[int, typer.Option(help="Number of simulated hospitals.")] = 5,
    per_site: Annotated[int, typer.Option(help="Training slices per site.")] = 300,
    test: Annotated[int, typer.Option(help="Held-out test slices (balanced, all scanners; for reporting).")] = 300,
    val: Annotated[int, typer.Option(help="Validation slices in val/ (drawn like test/; for every choice).")] = 300,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes identical files.")] = 0,
    difficulty: Annotated[float, typer.Option(help="1 = default task; higher is harder.")] = 1.0,
    public: Annotated[int, typer.Option(help="Slices of a public archive (one more scanner) in public/, "
                                             "for server-side pretraining; 0 = none.")] = 1500,
    site_sizes: Annotated[str, typer.Option(help="Training slices per site, comma-separated (one per site; "
                                                 "overrides --per-site), e.g. 4000,3000,2400,1800,800.")] = "",
    public_shift: Annotated[float, typer.Option(help="How far the public archive's scanner lies from the "
                                                     "hospitals' (noise, blur, contrast offset); 0 = like a site.")
                            ] = 0.0,
) -> None:
    """Write synthetic kidney-CT hospitals as real CT DICOM files with labels.csv."""
    try:
        sizes = tuple(int(n) for n in site_sizes.split(",")) if site_sizes.strip() else ()
    except ValueError as exc:
        raise ConfigError(f"`--site-sizes` must be comma-separated integers, got {site_sizes!r}") from exc
    cfg = PhantomConfig(sites=sites, per_site=per_site, test=test, size=size, seed=seed,
                        difficulty=difficulty, public=public, val=val, site_sizes=sizes, public_shift=public_shift)
    with progress_bar("info") as bar:
        task = bar.add_task("phantoms", total=cfg.training_slices + test + val + public, info="")
        profiles = generate_phantoms(out, config=cfg, progress=lambda n: bar.advance(task, n))
    table = Table("site", "normal/cyst/tumour mix", "noise HU", "offset HU", "blur px")
    for p in profiles:
        table.add_row(p.name, " / ".join(f"{m:.2f}" for m in p.class_mix), f"{p.noise_hu:.1f}",
                      f"{p.offset_hu:+.1f}", f"{p.blur_px:.2f}")
    if public:
        p = public_profile(cfg)
        table.add_row("public", " / ".join(f"{m:.2f}" for m in p.class_mix), f"{p.noise_hu:.1f}",
                      f"{p.offset_hu:+.1f}", f"{p.blur_px:.2f}")
    out_console.print(table)
    out_console.print(f"wrote {cfg.training_slices} training + {val} validation + {test} test + {public} public slices "
                      f"to {out}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Data folder: site-K/ folders (pooled) or one dataset.")],
    out: Annotated[Path, typer.Option(help="Run folder for model.pt and metrics.json.")],
    model: Annotated[ModelKind, typer.Option(help="Ref-CNN or Approx-CNN.")] = ModelKind.APPROX,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    test: Annotated[Path | None, typer.Option(help="Held-out set (default DATA/test).")] = None,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float | None, typer.Option(help="Learning rate [default: 3e-3, chosen on val/].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
    head: Annotated[str, typer.Option(help="Head: flatten (chosen on val/) or gap (global average pool).")
                    ] = "flatten",
    stem: Annotated[int, typer.Option(help="Patchify stem factor (4 for 256×256 slices; 1 = none).")] = 1,
    channels: Annotated[str, typer.Option(help="Output channels of each stage, comma-separated.")] = "16,32,64",
    residual_blocks: Annotated[int, typer.Option(help="Residual units after the last stage (0 = none).")] = 0,
    residual_convs: Annotated[int, typer.Option(help="conv3x3 → activation pairs in each residual body.")] = 1,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable files (reported) instead of stopping.")] = False,
    pacs: PacsOptions.URL = "",
    pacs_labels: PacsOptions.LABELS = None,
    pacs_study: PacsOptions.STUDY = "",
    pacs_series: PacsOptions.SERIES = "",
) -> None:
    """Train centrally on all sites pooled (the non-private upper bound) and evaluate.

    With ``--pacs`` the training slices come from a PACS (DICOMweb), cached in ``--data``.
    """
    pull_from_options(data, pacs, pacs_labels, pacs_study, pacs_series)
    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise typer.BadParameter(f"give integers separated by commas, got {channels!r}",
                                 param_hint="--channels") from None
    arch = ArchConfig(kind=model, input_size=size, head=HeadKind(head), stem=stem, channels=widths,
                      residual=residual_blocks > 0, res_blocks=max(1, residual_blocks), res_convs=residual_convs)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr or default_lr(model), seed=seed)
    with progress_bar("info") as bar:
        task = bar.add_task(f"train {model}", total=epochs, info="")

        def on_epoch(s: EpochStats) -> None:
            bar.update(task, advance=1, info=f"loss {s.loss:.3f}")

        val = data / "val" if (data / "val").is_dir() else None
        result = train_centralised(data, test=test or data / "test", out=out, arch=arch, train=cfg,
                                   on_error="skip" if skip_bad else "raise", on_epoch=on_epoch, val=val)
    _print_metrics(result.metrics, title=f"{model} on {test or data / 'test'}")
    if result.skipped:
        console.print(f"[yellow]{result.skipped} files skipped (see log above)")
    out_console.print(f"model: {result.model_path} (sha256 {result.model_sha256[:12]}…), "
                      f"{result.train_images} training images, {result.seconds:.0f} s")


def _run_config(data: Path, out: Path, **values: object) -> "RunConfig":
    return RunConfig(data_dir=str(data), out_dir=str(out), **values)  # type: ignore[arg-type]


@app.command()
def simulate(
    data: Annotated[Path, typer.Option(help="Data folder with site-K/ folders and test/.")],
    out: Annotated[Path, typer.Option(help="Run folder: metrics.json, global_model.pt, ledger, plot.")],
    sites: Annotated[int | None, typer.Option(help="Number of sites (default: all site-K folders).")] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 10,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 2,
    dp: Annotated[bool, typer.Option(help="DP-SGD at every site (Opacus).")] = True,
    secagg: Annotated[bool, typer.Option(help="Secure aggregation (Flower SecAgg+).")] = True,
    epsilon_budget: Annotated[float, typer.Option(help="ε budget asked of every site (a site refuses more than "
                                                        "its policy allows).")] = 8.0,
    target_epsilon: Annotated[float, typer.Option(help="ε the planned run spends (0 = the budget).")] = 0.0,
    noise_multiplier: Annotated[float, typer.Option(help="σ asked (0 = each site derives it from what is left "
                                                          "of its budget).")] = 0.0,
    delta: Annotated[float, typer.Option(help="δ asked (0 = each site's policy δ).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Per-sample clipping bound C asked.")] = 1.0,
    site_policy: Annotated[Path | None, typer.Option(help="Every virtual site's privacy policy (TOML; "
                                                          "`privrad policy init`); default: DP-SGD and SecAgg+ "
                                                          "required, ε ≤ 8, ledgers in DATA/ledgers/.")] = None,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx's μ (with --strategy fedprox).")] = 0.01,
    head: Annotated[str, typer.Option(help="Approx-CNN head: flatten or gap.")] = "flatten",
    public: Annotated[Path | None, typer.Option(help="Public archive the server pretrains on "
                                                     "(default DATA/public if present).")] = None,
    pretrain_epochs: Annotated[int, typer.Option(help="Epochs of public pretraining (0 = start from scratch).")] = 15,
    init_model: Annotated[Path | None, typer.Option(help="Start from this model.pt instead.")] = None,
    optimizer: Annotated[str, typer.Option(help="Local optimiser: adamw or sgd.")] = "adamw",
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 3e-3,
    augment: Annotated[bool, typer.Option(help="Random horizontal flips in local training.")] = True,
    secagg_timeout: Annotated[float, typer.Option(help="Seconds SecAgg+ waits for a stage.")] = 120.0,
    central_dp: Annotated[bool, typer.Option(help="Site-level central DP: sites clip their update, the "
                                                  "server noises the aggregate.")] = False,
    central_clipping_norm: Annotated[float, typer.Option(help="L2 bound on each site's update (central DP).")
                                     ] = 1.0,
    central_noise_multiplier: Annotated[float, typer.Option(help="Central σ (0 = derived from the central "
                                                                 "budget over the rounds).")] = 0.0,
    central_epsilon_budget: Annotated[float, typer.Option(help="Site-level ε budget of the whole run.")] = 8.0,
    central_delta: Annotated[float, typer.Option(help="Site-level δ.")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed of the initial model and local shuffling.")] = 0,
) -> None:
    """Federated training on Flower's Simulation Engine (Ray), one virtual SuperNode per site.

    The run's privacy settings are requests; each site reviews them against its own policy
    and refuses a round that asks for less.
    """
    cfg = _run_config(data, out, num_server_rounds=rounds, local_epochs=local_epochs, dp=dp, secagg=secagg,
                      epsilon_budget=epsilon_budget, target_epsilon=target_epsilon,
                      noise_multiplier=noise_multiplier, delta=delta, max_grad_norm=max_grad_norm,
                      image_size=size, strategy=strategy, proximal_mu=proximal_mu, secagg_timeout=secagg_timeout,
                      seed=seed, head=head,
                      optimizer=optimizer, learning_rate=lr, augment=augment, public_dir=str(public or ""),
                      pretrain_epochs=pretrain_epochs, initial_model=str(init_model or ""),
                      central_dp=central_dp, central_clipping_norm=central_clipping_norm,
                      central_noise_multiplier=central_noise_multiplier,
                      central_epsilon_budget=central_epsilon_budget, central_delta=central_delta)
    console.print(f"simulating {sites or 'all'} sites x {rounds} rounds (DP-SGD {'on' if dp else 'off'}, "
                  f"SecAgg+ {'on' if secagg else 'off'}, central DP {'on' if central_dp else 'off'}) …")
    policy = SitePolicy.load(site_policy) if site_policy is not None else None
    result = run_federated(cfg, sites=sites, policies=policy)
    table = Table("round", "macro-AUC", "test loss", "max ε", "central ε", "sites", "refused", "s",
                  title=f"federated run {out}")
    for row in result.metrics["rounds"]:
        refusals = ", ".join(f"{k} ×{v}" for k, v in row.get("refusals", {}).items()) or "–"
        table.add_row(str(row["round"]), f"{row['auc_macro']:.3f}", f"{row['loss']:.3f}",
                      f"{row.get('epsilon_max', 0.0):.2f}" if dp else "–",
                      f"{row['central_epsilon']:.2f}" if "central_epsilon" in row else "–",
                      f"{row.get('sites_contributed', '?')}", refusals, f"{row['seconds']:.0f}")
    initial = result.metrics.get("initial", {})
    if "auc_macro" in initial:
        out_console.print(f"initial model ({initial['source']}): macro-AUC {initial['auc_macro']:.3f}")
    out_console.print(table)
    final = result.metrics["final"]
    if final:
        per_site = ", ".join(f"{k} {v:.2f}" for k, v in final["epsilon"].items()) if dp else "– (DP-SGD off)"
        out_console.print(f"final macro-AUC {final['auc_macro']:.3f}; ε per site {per_site}")
        if final.get("central_dp"):
            c = final["central_dp"]
            out_console.print(f"central DP: site-level ε {c['epsilon']:.2f} at δ {c['delta']:g} "
                              f"(σ {c['noise_multiplier']:.3f}, C {c['clipping_norm']:g})")
    out_console.print(f"wall time {result.seconds:.0f} s, peak RSS {result.peak_rss_mb:.0f} MB; "
                      f"model {out / 'global_model.pt'}")


@app.command()
def select(
    data: Annotated[Path, typer.Option(help="Data folder with site-K/, val/ and test/.")],
    out: Annotated[Path, typer.Option(help="Folder for one run per candidate and selection.json/.md.")],
    epochs: Annotated[int, typer.Option(help="Centralised epochs per candidate.")] = 30,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    federated: Annotated[bool, typer.Option(help="Also choose the federated head (two DP + SecAgg+ runs).")] = True,
    rounds: Annotated[int, typer.Option(help="Rounds of each federated run.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
) -> None:
    """Re-make the model's choices on the validation split (the test set is only reported)."""
    with progress_bar("info") as bar:
        task = bar.add_task("candidates", total=None, info="")
        summary = run_selection(data, out, epochs=epochs, seed=seed, federated=federated, rounds=rounds, size=size,
                                on_candidate=lambda name, auc: bar.update(task, advance=1,
                                                                          info=f"{name}: val {auc:.3f}"))
    table = Table("choice", "candidate", "default", "val macro-AUC", "chosen", "test (chosen)",
                  title="choices on the validation split")
    for r in summary["rows"]:
        table.add_row(r["choice"], r["value"], "yes" if r["default"] else "", f"{r['val_auc_macro']:.3f}",
                      "yes" if r["chosen"] else "", f"{r['test_auc_macro']:.3f}" if r["chosen"] else "")
    out_console.print(table)
    out_console.print(f"{out / 'selection.md'}; every default chosen: {summary['defaults_confirmed']}")


policy_app = typer.Typer(help="A hospital's privacy policy: what its site allows, whatever the coordinator asks.",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("init")
def policy_init(
    out: Annotated[Path, typer.Option(help="Where to write the policy (TOML).")],
    epsilon_budget: Annotated[float, typer.Option(help="ε the site may ever spend (all runs on its ledger).")] = 8.0,
    delta: Annotated[float, typer.Option(help="δ of every ε the site accounts.")] = 1e-5,
    max_grad_norm: Annotated[float, typer.Option(help="Largest per-sample clipping bound a run may use.")] = 1.0,
    min_noise_multiplier: Annotated[float, typer.Option(help="Smallest σ a run may use.")] = 0.5,
    allow_no_dp: Annotated[bool, typer.Option(help="Let a run turn DP-SGD off (non-private training).")] = False,
    allow_no_secagg: Annotated[bool, typer.Option(help="Let a run send updates without SecAgg+.")] = False,
    ledger_dir: Annotated[str, typer.Option(help="Folder of the site's persistent ledger (relative to the "
                                                 "policy file; empty: DATA/ledgers beside the data).")] = "",
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a site privacy policy (the secure default unless loosened explicitly)."""
    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists; pass --force to overwrite it", param_hint="--out")
    policy = SitePolicy(dp_required=not allow_no_dp, epsilon_budget=epsilon_budget, delta=delta,
                        max_grad_norm=max_grad_norm, min_noise_multiplier=min_noise_multiplier,
                        secagg_required=not allow_no_secagg, ledger_dir=ledger_dir)
    policy.save(out)
    out_console.print(f"wrote {out}:")
    out_console.print(out.read_text())


@policy_app.command("show")
def policy_show(path: Annotated[Path, typer.Argument(help="A policy file.")]) -> None:
    """Validate a policy file and print what it allows."""
    policy = SitePolicy.load(path)
    table = Table("rule", "value", title=str(path))
    for key, value in policy.to_dict().items():
        table.add_row(key, str(value))
    out_console.print(table)


@app.command()
def local(
    data: Annotated[Path, typer.Option(help="Data folder with site-K/ folders and test/.")],
    out: Annotated[Path, typer.Option(help="Run folder: one model per site and metrics.json.")],
    rounds: Annotated[int, typer.Option(help="Rounds of the federated run to match (epochs = rounds x local).")] = 10,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round to match.")] = 2,
    dp: Annotated[bool, typer.Option(help="DP-SGD with the same budget as the federated run.")] = True,
    epsilon_budget: Annotated[float, typer.Option(help="Per-site ε budget.")] = 8.0,
    delta: Annotated[float, typer.Option(help="δ (0 = 1e-5).")] = 0.0,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    head: Annotated[str, typer.Option(help="Approx-CNN head: flatten or gap.")] = "flatten",
    public: Annotated[Path | None, typer.Option(help="Public archive the server pretrains on "
                                                     "(default DATA/public if present).")] = None,
    pretrain_epochs: Annotated[int, typer.Option(help="Epochs of public pretraining (0 = start from scratch).")] = 15,
    init_model: Annotated[Path | None, typer.Option(help="Start from this model.pt instead.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial model and local shuffling.")] = 0,
) -> None:
    """Train each site alone (the no-collaboration baseline) and evaluate each on the test set.

    Every site starts from the same initial model as ``privrad simulate`` would.
    """
    cfg = _run_config(data, out, num_server_rounds=rounds, local_epochs=local_epochs, dp=dp,
                      epsilon_budget=epsilon_budget, delta=delta, image_size=size, secagg=False, head=head,
                      public_dir=str(public or ""), pretrain_epochs=pretrain_epochs,
                      initial_model=str(init_model or ""), seed=seed)
    table = Table("site", "macro-AUC", "ε", title="local-only models")
    with progress_bar("info") as bar:
        task = bar.add_task("sites", total=None, info="")

        def on_site(name: str, entry: dict[str, object]) -> None:
            bar.advance(task)
            table.add_row(name, f"{entry['auc_macro']:.3f}", f"{entry.get('epsilon', 0.0):.2f}")

        summary = run_local(cfg, on_site=on_site)
    out_console.print(table)
    out_console.print(f"initial model ({summary['initial']['source']}): macro-AUC "
                      f"{summary['initial']['auc_macro']:.3f}; mean local macro-AUC {summary['mean_auc_macro']:.3f}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="A model.pt written by train or simulate.")],
    data: Annotated[Path, typer.Option(help="Labelled data to evaluate on.")],
    out: Annotated[Path | None, typer.Option(help="Write the metrics as JSON here too.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable files (reported).")] = False,
) -> None:
    """Re-compute AUC/AUPRC/accuracy of a saved model on a labelled data set."""
    ckpt = load_checkpoint(model)
    pre = Preprocess(**ckpt.meta["preprocess"])
    dataset = load_dataset(data, classes=ckpt.meta["classes"], preprocess=pre,
                           on_error="skip" if skip_bad else "raise")
    metrics = evaluate_model(ckpt.model, dataset)
    _print_metrics(metrics, title=f"{model} on {data}")
    out_console.print_json(json.dumps(metrics.to_dict()))
    if out is not None:
        atomic_write_json(out, metrics.to_dict())


@app.command()
def scan(
    data: Annotated[Path, typer.Option(help="A data folder (site-K/ folders, DICOM+labels.csv, "
                                            "PNG tree) or .npz.")],
    size: Annotated[int, typer.Option(help="Resize target, as for training.")] = 64,
    pacs: PacsOptions.URL = "",
    pacs_labels: PacsOptions.LABELS = None,
    pacs_study: PacsOptions.STUDY = "",
    pacs_series: PacsOptions.SERIES = "",
) -> None:
    """Check a data set: how many images load, per class, and which files are skipped and why.

    With ``--pacs`` the instances are first pulled from the PACS into ``--data`` (its cache).
    """
    pulled = pull_from_options(data, pacs, pacs_labels, pacs_study, pacs_series)
    folders = site_folders(data) or [data]
    test = data / "test"
    if test.is_dir():
        folders.append(test)
    table = Table("folder", "images", *("per class",), "skipped")
    problems: list[SkippedFile] = list(pulled.skipped) if pulled is not None else []
    for folder in folders:
        ds = load_dataset(folder, preprocess=Preprocess(size=size), on_error="skip")
        table.add_row(str(folder), str(len(ds)), json.dumps(ds.class_counts()), str(len(ds.skipped)))
        problems += ds.skipped
    out_console.print(table)
    for s in problems:
        out_console.print(f"skipped {s.path}: {s.reason}")
    if problems:
        raise typer.Exit(1)


@app.command()
def budget(
    data: Annotated[Path, typer.Option(help="Data folder with labelled DICOM site-K/ folders, test/ "
                                            "(and public/ for pretraining).")],
    out: Annotated[Path, typer.Option(help="Sweep folder (resumed if it exists with the same settings).")],
    epsilons: Annotated[str, typer.Option(help="Target ε per site, comma separated; inf = DP-SGD off.")
                        ] = "1,2,4,8,inf",
    seeds: Annotated[int, typer.Option(help="Seeds per ε.")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds per run.")] = 10,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 2,
    holdout: Annotated[float, typer.Option(help="Share of each site's records held out of training as the "
                                                "membership audit's non-members.")] = 0.5,
    delta: Annotated[float, typer.Option(help="δ of every site.")] = 1e-5,
    pretrain_epochs: Annotated[int, typer.Option(help="Public pretraining epochs of the initial model "
                                                      "(0 = random start).")] = 15,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    secagg: Annotated[bool, typer.Option(help="Secure aggregation (Flower SecAgg+).")] = True,
    augment: Annotated[bool, typer.Option(help="Random horizontal flips in local training (--no-augment "
                                               "overfits more: the membership audit's positive control).")] = True,
    inversion: Annotated[bool, typer.Option(help="Also run the gradient-inversion audit (inversion.json/.png).")
                         ] = True,
) -> None:
    """Privacy-budget sweep: federated DP runs per target ε × seed, membership audit, plots (resumable)."""
    cfg = SweepConfig(data=str(data), out=str(out), epsilons=parse_epsilons(epsilons), seeds=seeds,
                      rounds=rounds, local_epochs=local_epochs, holdout=holdout, delta=delta,
                      pretrain_epochs=pretrain_epochs, image_size=size, secagg=secagg, augment=augment)
    start = time.perf_counter()
    with progress_bar("info") as bar:
        task = bar.add_task("budget sweep", total=len(plan(cfg)), info="preparing (split, pretraining, "
                                                                       "centralised reference)")

        def on_point(point: SweepPoint, result: dict[str, Any] | None) -> None:
            if result is None:
                bar.update(task, info=f"running {point.name}")
                return
            mia = result["membership"].get("calibrated", result["membership"]["loss"])
            bar.update(task, advance=1, info=f"{point.name}: AUC {result['auc_macro']:.3f}, "
                                             f"attack AUC {mia['auc']:.3f}")

        summary = run_sweep(cfg, on_point=on_point)
    if inversion:
        _print_inversion(_run_inversion(cfg))
    _print_budget(summary, out)
    out_console.print(f"wall time {time.perf_counter() - start:.0f} s; wrote {out}/budget.json, audit.json, "
                      f"budget.png, audit.png{', inversion.json, inversion.png' if inversion else ''}; "
                      f"`privrad report {out}` renders the report")


def _print_budget(summary: SweepSummary, out: Path) -> None:
    table = Table("target ε", "achieved ε (max)", "σ", "macro-AUC", "attack AUC (calibrated)",
                  "TPR @ 1% FPR", title=f"budget sweep {out}")
    for p in summary.points:
        table.add_row(p.epsilon, "–" if p.epsilon_achieved_max is None else f"{p.epsilon_achieved_max:.3f}",
                      ", ".join(f"{s:.3f}" for s in p.noise_multiplier) or "–",
                      f"{p.auc_macro.mean:.3f} ± {p.auc_macro.std:.3f}",
                      f"{p.attack_auc.mean:.3f} ± {p.attack_auc.std:.3f}", f"{p.attack_tpr_at_1pct_fpr.mean:.3f}")
    out_console.print(table)
    for key, ref in summary.references.items():
        out_console.print(f"{key.replace('_', ' ')}: macro-AUC {ref.mean:.3f} ± {ref.std:.3f}")


@app.command()
def invert(
    run: Annotated[Path, typer.Argument(help="A budget sweep folder (uses its seed-0 initial model, sites and σ).")],
    batch_sizes: Annotated[str, typer.Option(help="Images in each site's attacked batch, comma separated.")
                           ] = "1,32",
    method: Annotated[str, typer.Option(help="features (recover the classifier input, invert the features) "
                                             "or gradients (Inverting Gradients).")] = "features",
    iterations: Annotated[int, typer.Option(help="Optimisation steps per restart.")] = 1000,
    restarts: Annotated[int, typer.Option(help="Random restarts; the attacker keeps its best match.")] = 1,
) -> None:
    """Gradient-inversion audit of a sweep: plain update, SecAgg+ (masked and aggregate), DP-SGD."""
    cfg = load_sweep(run)
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--batch-sizes: {batch_sizes!r} is not a list of integers") from None
    grad = method == "gradients"  # each attack with the step size and prior measured to suit it
    attack = InversionConfig(method=method, iterations=iterations, restarts=restarts, lr=0.1 if grad else 0.05,
                             tv_weight=1e-3 if grad else 0.1)
    out = _run_inversion(cfg, batch_sizes=sizes, attack=attack)
    _print_inversion(out)
    out_console.print(f"wrote {run}/inversion.json and {run}/inversion.png")


def _run_inversion(cfg: "SweepConfig", **kw: Any) -> dict[str, Any]:
    """The gradient-inversion audit of a sweep, one progress bar per setting."""
    with progress_bar("info") as bar:
        tasks: dict[str, Any] = {}

        def progress(setting: str, done: int, total: int) -> None:
            if setting not in tasks:
                tasks[setting] = bar.add_task(f"invert {setting}", total=total, info="")
            bar.update(tasks[setting], completed=done)

        return run_inversion_audit(cfg, progress=progress, **kw)


def _print_inversion(out: dict[str, Any]) -> None:
    table = Table("batch", "setting", "what the server holds", "best SSIM", "other patient SSIM", "PSNR dB",
                  title=f"gradient inversion ({out['attack']['method']} attack)")
    for batch, rows in out["results"].items():
        for name, v in rows.items():
            table.add_row(batch, name, v["about"], f"{v['best_ssim']:.3f}", f"{v['population_ssim']:.3f}",
                          f"{v['best_psnr']:.1f}")
    out_console.print(table)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A budget sweep folder or a federated run folder.")],
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default RUN/report.html).")] = None,
) -> None:
    """Render a self-contained HTML report (settings, tables, inlined plots) of a sweep or a run."""
    path = render_report(run, out)
    out_console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def _print_metrics(metrics: ClassificationMetrics, *, title: str) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("AUC")
    table.add_column("AUPRC")
    auc, auprc = metrics.auc_per_class, metrics.auprc_per_class
    for name in auc:
        a, p = auc[name], auprc[name]
        table.add_row(name, "n/a" if a is None else f"{a:.3f}", "n/a" if p is None else f"{p:.3f}")
    table.add_row("[bold]macro", f"[bold]{metrics.auc_macro:.3f}", "")
    out_console.print(table)
    out_console.print(f"accuracy {metrics.accuracy:.3f} on {metrics.n} images")


deploy_app = typer.Typer(help="Run the federation across hospitals: keys, certificates, registration, the proxy, "
                              "SuperLink connections.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("node-key")
def deploy_node_key(
    site: Annotated[str, typer.Option(help="This hospital's name (the key's comment, the SuperNode's name).")],
    out: Annotated[Path, typer.Option(help="Folder for node (private, mode 600) and node.pub.")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """At the hospital: make this SuperNode's ECDSA key pair; send only node.pub to the coordinator."""
    key = make_node_key(out, site=site, overwrite=force)
    out_console.print(f"{key.private_key} (mode 600) stays here: give it to flower-supernode "
                      f"--auth-supernode-private-key; send {key.public_key} to the coordinator")


@deploy_app.command("certs")
def deploy_certs(
    out: Annotated[Path, typer.Option(help="Coordinator folder: ca-private/ca.key, handout/ca.crt, "
                                           "superlink.crt/.key.")],
    host: Annotated[list[str], typer.Option(help="A DNS name or IP the hospitals reach the SuperLink's proxy at "
                                                 "(repeat); 127.0.0.1 and localhost are always added.")],
    days: Annotated[int, typer.Option(help="Validity of the certificates.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """At the coordinator: a private CA and the SuperLink's TLS certificate (hospitals make their own keys)."""
    certs = make_certs(out, hosts=host, days=days, overwrite=force)
    out_console.print(f"SuperLink {certs.superlink_cert} + {certs.superlink_key} (mode 600); "
                      f"CA key {certs.ca_key} (folder 700: keep it offline, never hand it out)")
    out_console.print(f"hand out {certs.ca_cert} (the only file in {certs.handout}) to every hospital and the operator")


@deploy_app.command("register")
def deploy_register(
    pub: Annotated[list[Path], typer.Option(help="A hospital's node.pub as received (repeat).")],
    connection: Annotated[str, typer.Option(help="The operator's SuperLink connection (see deploy connection).")]
        = "hospitals",
    site: Annotated[str | None, typer.Option(help="SuperNode name [default: the key's comment]; one --pub only.")]
        = None,
    flwr_home: Annotated[Path | None, typer.Option(help="Flower's config folder [default: $FLWR_HOME or "
                                                        "~/.flwr].")] = None,
) -> None:
    """At the coordinator: check each received public key (a private key is refused) and register it."""
    if site is not None and len(pub) != 1:
        raise ConfigError(f"--site names one key, got {len(pub)} --pub")
    home = flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    keys = [read_node_public_key(p, site=site) for p in pub]   # all checked before any is registered
    for key in keys:
        node_id = register_supernode(key, connection=connection, env=flower_env(home))
        out_console.print(f"{key.site}: SuperNode {node_id} registered ({key.path})")


@deploy_app.command("proxy")
def deploy_proxy(
    superlink: Annotated[str, typer.Option(help="The SuperLink's loopback HOST:PORT (flower-superlink --host "
                                                "127.0.0.1 --port PORT).")],
    listen: Annotated[str, typer.Option(help="HOST:PORT the hospitals' SuperNodes dial (Fleet API only).")],
    operator_listen: Annotated[str, typer.Option(help="HOST:PORT of the operator's flwr (Control API only; "
                                                      "loopback).")],
    cert: Annotated[Path, typer.Option(help="TLS certificate (superlink.crt).")],
    key: Annotated[Path, typer.Option(help="Its key (superlink.key).")],
    ca_cert: Annotated[Path, typer.Option(help="The federation's ca.crt (checks the SuperLink behind nginx).")],
    prefix: Annotated[Path, typer.Option(help="nginx's own folder: config, pid, logs, temp files.")],
    operator_network: Annotated[bool, typer.Option(help="Allow a non-loopback --operator-listen (an "
                                                        "operator-only network).")] = False,
) -> None:
    """At the coordinator: nginx in front of the SuperLink, in the foreground until Ctrl-C."""
    cfg = ProxyConfig(prefix=prefix, superlink=superlink, hospital_listen=listen, operator_listen=operator_listen,
                      cert=cert, key=key, ca_cert=ca_cert, operator_network=operator_network)
    stop_on_sigterm()   # `kill` stops nginx too, as Ctrl-C does
    with NginxProxy(cfg) as proxy:
        out_console.print(f"nginx {proxy.nginx} ({cfg.conf}): hospitals → {listen} (Fleet API), operator → "
                          f"{operator_listen} (Control API), SuperLink {superlink}; Ctrl-C stops it")
        try:
            code = proxy.proc.wait() if proxy.proc is not None else 1
        except KeyboardInterrupt:
            code = 0
    if code:
        raise ConfigError(f"nginx exited with {code}: see {cfg.error_log}")


@deploy_app.command("connection")
def deploy_connection(
    address: Annotated[str, typer.Option(help="SuperLink HOST:PORT.")],
    ca_cert: Annotated[Path, typer.Option(help="The federation's ca.crt.")],
    name: Annotated[str, typer.Option(help="Connection name for flwr run/ls/stop.")] = "hospitals",
    flwr_home: Annotated[Path | None, typer.Option(help="Flower's config folder [default: $FLWR_HOME or "
                                                        "~/.flwr].")] = None,
    make_default: Annotated[bool, typer.Option("--default/--no-default",
                                               help="Make it the connection flwr uses when none is named "
                                                    "(otherwise name it: `flwr run . hospitals`).")] = False,
) -> None:
    """Write a TLS SuperLink connection into Flower's config.toml; other connections are kept."""
    home = flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    path = write_connection(home, name=name, address=address, ca_cert=ca_cert, default=make_default)
    out_console.print(f"{path}: connection {name!r} → {address} (TLS, CA {ca_cert})"
                      f"{', the default' if make_default else ''}")


app.add_typer(he_app, name="he")
app.add_typer(vault_app, name="vault")
app.add_typer(keyed_app, name="keyed")
app.add_typer(benchmark_app, name="benchmark")
app.add_typer(pacs_app, name="pacs")
app.command("leakage")(leakage)


def main() -> None:
    """Entry point: run the CLI, turning privrad's own errors into a one-line message."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)  # libraries such as Flower log DEBUG records that propagate here
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        app()
    except PrivradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
