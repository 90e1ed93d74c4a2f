"""``privrad he ...``: compile, keys, encrypt, infer (server side), decrypt, check, bench."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clients.pacs import connect
from federation.console import console, out_console, progress_bar
from federation.errors import ConfigError
from federation.storage import atomic_write_bytes, atomic_write_json, load_checkpoint
from he_inference.artifact import CompiledModel, MetaKey
from he_inference.bench import run_bench
from he_inference.check import he_check
from he_inference.client import TOKEN_ENV, ServiceClient, encrypt_image, load_token, prediction
from he_inference.compiler import CompileOptions, compile_checkpoint, load_calibration
from he_inference.images import read_image
from he_inference.keys import PublicKeys, SecretKeys
from he_inference.passes.program import Kind
from he_inference.roundtrip import LayerRow, layer_table
from he_inference.serial import ContainerKind, unpack
from he_inference.server import InferenceServer
from he_inference.service import ServiceLimits
from he_inference.service import serve as run_service
from he_inference.tokens import TokenStore
from simulations.he_demo import run_demo
from simulations.he_load import run_load
from simulations.pacs import classify_pacs_instance, provenance_of

he_app = typer.Typer(help="CKKS encrypted inference: the hospital keeps the secret key, the server sees ciphertext.",
                     no_args_is_help=True)


def _print_layers(rows: Sequence[LayerRow], total: float, title: str) -> None:
    table = Table("layer", "seconds", "rotations", "key switches", "plain mults", "ct mults", title=title)
    for r in rows:
        table.add_row(r.layer, f"{r.seconds_median:.3f}", str(r.count(Kind.ROT)), str(r.key_switches),
                      str(r.count(Kind.MULACC)), str(r.count(Kind.SQUARE) + r.count(Kind.MUL)))
    table.add_row("[bold]total", f"[bold]{total:.3f}", "", "", "", "")
    out_console.print(table)


@he_app.command("compile")
def compile_(
    model: Annotated[Path, typer.Option(help="A model.pt written by train or simulate (an Approx-CNN).")],
    out: Annotated[Path, typer.Option(help="Where to write the compiled model (.he).")],
    calibration: Annotated[Path | None, typer.Option(help="PUBLIC or synthetic images that bound every layer's "
                                                          "values, e.g. DATA/public (default: uniform noise).")
                           ] = None,
    private_calibration: Annotated[Path | None, typer.Option(help="A site's OWN images instead (their value "
                                                                  "ranges go into model.he, which the server "
                                                                  "receives); prints a warning.")] = None,
    n_calibration: Annotated[int, typer.Option(help="How many calibration images to use.")] = 64,
    max_rotation_keys: Annotated[int | None, typer.Option(help="Galois keys the client makes at most (fewer key "
                                                                "bytes to upload, more key switches per image); "
                                                                "default: one per rotation step.")] = None,
) -> None:
    """Fold, range-check, pick CKKS parameters and plan the packing; save a self-contained .he file.

    ``model.he`` goes to the inference server, and the value ranges measured on the
    calibration images go with it, so they come from public or synthetic images by default.
    """
    if calibration is not None and private_calibration is not None:
        raise typer.BadParameter("give --calibration (public) or --private-calibration, not both")
    if calibration is not None and re.fullmatch(r"site-\d+", calibration.resolve().name):
        raise typer.BadParameter(f"{calibration} looks like a hospital's own data: calibrate on public images "
                                 "(e.g. DATA/public), or pass it as --private-calibration to accept that its "
                                 "value ranges go into model.he", param_hint="--calibration")
    ckpt = load_checkpoint(model)
    calib = None
    folder = private_calibration or calibration
    if folder is not None:
        calib = load_calibration(folder, meta=ckpt.meta, n=n_calibration, private=private_calibration is not None)
        if private_calibration is not None:
            console.print(f"[yellow]warning:[/yellow] model.he will carry the per-layer maximum |value| measured on "
                          f"{len(calib.images)} of {folder}'s own images; whoever receives model.he (the inference "
                          "server) learns those statistics")
    t0 = time.perf_counter()
    compiled = compile_checkpoint(model, checkpoint=ckpt, calibration=calib,
                                  options=CompileOptions(max_rotation_keys=max_rotation_keys)).compiled
    digest = compiled.save(out)
    p = compiled.params
    out_console.print(f"{out}: N={p.poly_degree}, moduli {list(p.coeff_bits)} bits, scale 2^{p.scale_bits}, "
                      f"depth {compiled.depth}, {compiled.plan.n_inputs} input ciphertexts, "
                      f"{len(compiled.plan.steps)} rotation steps on {len(compiled.key_steps)} Galois keys "
                      f"({compiled.key_switches} key switches per image), {len(compiled.plan.masks)} plaintext masks "
                      f"({time.perf_counter() - t0:.1f} s); sha256 {digest[:16]}…")


@he_app.command()
def keygen(
    model: Annotated[Path, typer.Option(help="The compiled model (.he).")],
    out: Annotated[Path, typer.Option(help="Key folder: secret.key (keep it) and public.keys (send it).")],
) -> None:
    """Client: a secret key and the evaluation keys this model needs (relinearisation + its rotations)."""
    m = CompiledModel.load(model)
    t0 = time.perf_counter()
    keys = SecretKeys.generate(m.params, m.key_steps)
    spath, ppath = keys.save(out)
    out_console.print(f"secret key → {spath} (mode 600, never leaves this machine); evaluation keys → {ppath} "
                      f"({ppath.stat().st_size / 1e6:.1f} MB, {len(m.key_steps)} Galois keys) "
                      f"in {time.perf_counter() - t0:.1f} s")


@he_app.command()
def encrypt(
    images: Annotated[list[Path], typer.Argument(help="DICOM slices (or .npy arrays C×H×W in [0, 1]).")],
    keys: Annotated[Path, typer.Option(help="The key folder from keygen (its secret.key).")],
    model: Annotated[Path, typer.Option(help="The compiled model (.he).")],
    out: Annotated[Path, typer.Option(help="Output .enc file (one image) or folder (several).")],
) -> None:
    """Client: preprocess as in training, pack, encrypt with the secret key (seeded, half-size)."""
    m = CompiledModel.load(model)
    sk = SecretKeys.load(keys, m.params)
    for img in images:
        target = out if len(images) == 1 else out / f"{img.stem}.enc"
        data = encrypt_image(m, sk, read_image(img, m.meta.get(MetaKey.PREPROCESS, {})))
        atomic_write_bytes(target, data)
        out_console.print(f"{img} → {target} ({len(data) / 1e6:.2f} MB)")


@he_app.command()
def infer(
    upload: Annotated[Path, typer.Argument(help="An encrypted image (.enc) from encrypt.")],
    model: Annotated[Path, typer.Option(help="The compiled model (.he).")],
    eval_keys: Annotated[Path, typer.Option(help="The client's public.keys (or its folder); a secret key is "
                                                 "refused.")],
    out: Annotated[Path, typer.Option(help="Where to write the encrypted logits.")],
    workers: Annotated[int, typer.Option(help="Processes for the encrypted forward pass.")] = 2,
) -> None:
    """Server: run the whole network on the ciphertext; never sees the secret key or the image."""
    m = CompiledModel.load(model)
    pk = PublicKeys.load(eval_keys, m.params)
    with InferenceServer(m, pk, workers=workers, model_path=model, progress=console.print) as server, \
            progress_bar("layer", transient=True) as bar:
        task = bar.add_task("encrypted forward pass", total=len(m.plan.layers), layer="")
        t0 = time.perf_counter()
        reply, timings = server.infer(upload.read_bytes(),
                                      progress=lambda name, k, n: bar.update(task, completed=k, layer=name))
        total = time.perf_counter() - t0
    atomic_write_bytes(out, reply)
    _print_layers(layer_table([timings], m), total, f"encrypted inference, {workers} worker(s)")
    out_console.print(f"→ {out} ({len(reply) / 1e6:.2f} MB)")


@he_app.command()
def decrypt(
    reply: Annotated[Path, typer.Argument(help="Encrypted logits (.enc) from infer.")],
    keys: Annotated[Path, typer.Option(help="The key folder from keygen.")],
) -> None:
    """Client: decrypt the logits; prints class probabilities as JSON."""
    sk = SecretKeys.load(keys)
    data = reply.read_bytes()
    head, _ = unpack(data, ContainerKind.ENCRYPTED_LOGITS, source=str(reply))
    logits = sk.decrypt(data, model_sha256=None, source=str(reply))
    out_console.print_json(json.dumps({"model_sha256": head["model_sha256"],
                                       **prediction(logits, head.get("classes") or []).to_dict()}))


@he_app.command()
def check(
    model: Annotated[Path, typer.Option(help="A model.pt (Approx-CNN) to compile and check.")],
    data: Annotated[Path, typer.Option(help="Held-out labelled images (e.g. DATA/test).")],
    out: Annotated[Path, typer.Option(help="Write the report (JSON) here.")],
    n: Annotated[int, typer.Option(help="Images to classify under encryption.")] = 50,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 2,
) -> None:
    """The full client → server → client loop on n images, compared with the plaintext model."""
    report = he_check(model, data, n=n, workers=workers, progress=console.print)
    atomic_write_json(out, report.to_dict())
    _print_layers(report.layers, report.server_s_median, "median per layer")
    out_console.print_json(json.dumps(report.summary()))


@he_app.command()
def bench(
    size: Annotated[int, typer.Option(help="Image side: 64 or 256.")] = 64,
    model: Annotated[Path | None, typer.Option(help="A model.pt; default: the built-in Approx-CNN for the size "
                                                    "(random weights: time does not depend on them).")] = None,
    runs: Annotated[int, typer.Option(help="Encrypted passes to time (median reported).")] = 3,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 2,
    baseline: Annotated[bool, typer.Option(help="Also time TenSEAL's high-level API on the layers it can "
                                                "express, in the same run.")] = True,
    out: Annotated[Path | None, typer.Option(help="Write the figures (JSON) here too.")] = None,
) -> None:
    """Per-layer times and the total of one encrypted classification; ratios against TenSEAL's high-level API."""
    report = run_bench(size=size, model_path=model, runs=runs, workers=workers, baseline=baseline,
                       progress=console.print)
    _print_layers(report.layers, report.server_s_median, f"{size}×{size}, median of {runs}")
    out_console.print_json(json.dumps(report.summary()))
    if out is not None:
        atomic_write_json(out, report.to_dict())


@he_app.command()
def serve(
    model: Annotated[Path, typer.Option(help="The compiled model (.he).")],
    tokens: Annotated[Path, typer.Option(help="The hospitals' tokens file (`he token add`); every endpoint but "
                                              "/health needs one of its tokens.")],
    host: Annotated[str, typer.Option(help="Interface to listen on; a non-loopback one needs TLS or --insecure.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Processes for each encrypted forward pass.")] = 2,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (enables HTTPS).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of the certificate.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plaintext HTTP on a non-loopback host (behind your own "
                                                "TLS terminator only).")] = False,
    max_clients: Annotated[int, typer.Option(help="Key sets kept loaded in all (each costs memory: see "
                                                  "docs/he-inference.md).")] = 4,
    keys_per_hospital: Annotated[int, typer.Option(help="Key sets one hospital may hold (more replace its own).")
                                 ] = 1,
    key_idle_s: Annotated[float, typer.Option(help="When full, another hospital's key set unused this long may "
                                                   "leave for a new one.")] = 900.0,
    max_queue: Annotated[int, typer.Option(help="Inference requests admitted at once (running or waiting); more "
                                                "get 503 + Retry-After.")] = 16,
    key_store: Annotated[Path | None, typer.Option(help="Folder keeping the registered key sets across restarts "
                                                        "(default: registered-keys/ beside the model).")] = None,
    keep_keys: Annotated[bool, typer.Option(help="Keep registered key sets on disk (--no-keep-keys: in memory "
                                                 "only; hospitals upload them again after a restart).")] = True,
) -> None:
    """Server: the encrypted-inference web service (public keys and ciphertext only, bearer tokens)."""
    limits = ServiceLimits(max_clients=max_clients, keys_per_hospital=keys_per_hospital, key_idle_s=key_idle_s,
                           max_queue=max_queue)
    store = (key_store or model.parent / "registered-keys") if keep_keys else None
    run_service(model, tokens=tokens, host=host, port=port, workers=workers, tls_cert=tls_cert, tls_key=tls_key,
                insecure=insecure, limits=limits, progress=console.print, key_store=store)


@he_app.command()
def classify(
    server: Annotated[str, typer.Option(help="Service URL, e.g. http://127.0.0.1:8000.")],
    keys: Annotated[Path, typer.Option(help="This hospital's key folder (created on first use).")],
    images: Annotated[list[Path] | None, typer.Argument(help="DICOM slices (or .npy arrays C×H×W in [0, 1]).")
                      ] = None,
    token_file: Annotated[Path | None, typer.Option(help=f"File holding this hospital's token (default: the "
                                                         f"{TOKEN_ENV} variable).")] = None,
    ca_cert: Annotated[Path | None, typer.Option(help="CA certificate to verify an HTTPS service.")] = None,
    pacs: Annotated[str, typer.Option(help="Classify PACS instances instead of files: the DICOMweb root.")] = "",
    study: Annotated[str, typer.Option(help="With --pacs: the Study Instance UID.")] = "",
    series: Annotated[str, typer.Option(help="With --pacs: the Series Instance UID (looked up if omitted).")
                      ] = "",
    instance: Annotated[list[str] | None, typer.Option(help="With --pacs: a SOP Instance UID (repeatable).")
                        ] = None,
    cache: Annotated[Path, typer.Option(help="With --pacs: where the retrieved instances are kept.")
                     ] = Path("runs/pacs-cache"),
    store_sr: Annotated[bool, typer.Option(help="With --pacs: store each result in the PACS as a DICOM SR.")
                        ] = True,
    model_sha256: Annotated[str, typer.Option(help="Refuse a service whose model is not this checkpoint sha256.")
                            ] = "",
) -> None:
    """Client: encrypt each image, have the service classify it on ciphertext, decrypt; prints JSON.

    With ``--pacs`` the images are PACS instances, and each result goes back to the same PACS as
    a DICOM Structured Report (finding, per-class probabilities, model sha256, ε, source image).
    """
    if bool(pacs) == bool(images):
        raise ConfigError("give image files, or --pacs with --study and --instance, not both")
    with ServiceClient(server, keys, token=load_token(token_file), ca_cert=ca_cert) as client:
        if not pacs:
            if model_sha256:
                provenance_of(client, expect_sha256=model_sha256)
            out_console.print_json(json.dumps([r.to_dict() for r in client.classify_files(images or [])]))
            return
        if not study or not instance:
            raise ConfigError("--pacs needs --study and at least one --instance")
        dicomweb = connect(pacs)
        done = [classify_pacs_instance(client, dicomweb, pacs, study=study, series=series, instance=uid,
                                       cache=cache, store_sr=store_sr, expect_sha256=model_sha256)
                for uid in instance]
    for d in done:
        if d.sr_url:
            console.print(f"SR for {d.sop_instance_uid} stored: {d.sr_url}")
    out_console.print_json(json.dumps([d.to_dict() for d in done]))


@he_app.command()
def load(
    size: Annotated[int, typer.Option(help="Image side of the built-in Approx-CNN (random weights): 64 or 256.")
                    ] = 64,
    model: Annotated[Path | None, typer.Option(help="A model.pt instead of the built-in one.")] = None,
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 16,
    hospitals: Annotated[int, typer.Option(help="Hospitals the clients belong to (each its token and keys).")
                         ] = 4,
    requests: Annotated[int, typer.Option(help="Classifications per client.")] = 5,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for model.he, tokens, keys and load.json.")] = Path("runs/load"),
) -> None:
    """Load test: start the service, N concurrent clients of H hospitals; p50/p95 latency, peak server RSS."""
    report = run_load(out, size=size, checkpoint=model, clients=clients, hospitals=hospitals, requests=requests,
                      workers=workers, say=console.print)
    out_console.print_json(json.dumps(report.to_dict()))


token_app = typer.Typer(help="The hospitals' bearer tokens for `he serve` (only hashes are stored).",
                        no_args_is_help=True)
he_app.add_typer(token_app, name="token")
TokensOption = Annotated[Path, typer.Option(help="The tokens file `he serve --tokens` reads.")]


@token_app.command("add")
def token_add(
    hospital: Annotated[str, typer.Argument(help="The hospital's name (letters, digits, . _ -).")],
    tokens: TokensOption,
) -> None:
    """Issue a token for HOSPITAL: printed once on stdout, only its hash is stored."""
    token = TokenStore.add(tokens, hospital)
    console.print(f"token for {hospital} added to {tokens} (mode 600, hash only); give it to the hospital now, "
                  "it is not shown again:")
    out_console.print(token, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(tokens: TokensOption) -> None:
    """The hospitals holding tokens, when each was issued and its fingerprint."""
    table = Table("hospital", "created", "fingerprint", title=str(tokens))
    for r in TokenStore.load(tokens).records:
        table.add_row(r.hospital, r.created, r.fingerprint)
    out_console.print(table)


@token_app.command("revoke")
def token_revoke(
    hospital: Annotated[str, typer.Argument(help="The hospital whose tokens stop working.")],
    tokens: TokensOption,
) -> None:
    """Revoke every token of HOSPITAL (a running service refuses them at the next request)."""
    n = TokenStore.revoke(tokens, hospital)
    out_console.print(f"revoked {n} token(s) of {hospital} in {tokens}")


@he_app.command()
def demo(
    run: Annotated[Path, typer.Option(help="A federated run folder (global_model.pt, metrics.json).")],
    data: Annotated[Path, typer.Option(help="The phantom data folder (public/ for calibration, test/).")],
    out: Annotated[Path, typer.Option(help="Where model.he, the client's keys and demo.json go.")],
    workers: Annotated[int, typer.Option(help="Server processes.")] = 2,
) -> None:
    """Compile the federated model, serve it on loopback, classify one encrypted test slice, print it all."""
    s = run_demo(run, data, out, workers=workers, say=console.print)
    eps = s.epsilon_spent_max
    table = Table("", "", title="privrad: federated DP training → encrypted classification")
    table.add_row("federated model", f"macro-AUC {s.federated_macro_auc:.3f}, ε ≤ {eps:.2f} per site "
                  f"(δ = {s.delta})" if eps is not None else "(no privacy record)")
    table.add_row("slice", f"{s.slice} (true label: {s.true_label})")
    table.add_row("HE prediction", f"{s.he_prediction}  " + ", ".join(f"{k} {v:.3f}"
                                                                    for k, v in s.probabilities.items()))
    table.add_row("timings", f"service start {s.service_start_s:.1f} s, client keys + registration "
                             f"{s.client_keygen_and_register_s:.1f} s, encrypted round trip "
                             f"{s.encrypted_round_trip_s:.2f} s (server {s.server_s:.2f} s)")
    table.add_row("sizes", f"upload {s.upload_bytes / 1e6:.2f} MB, download {s.download_bytes / 1e6:.2f} MB")
    out_console.print(table)
