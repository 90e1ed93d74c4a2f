"""``privrad pacs ...``: a hospital's PACS (DICOMweb) as data source and as the place results go."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clients.pacs import PACS_PASSWORD_ENV, PACS_USER_ENV, PacsSource, SyncReport, skip_counts, sync, upload_folder
from federation.console import console, out_console, progress_bar
from federation.errors import ConfigError
from federation.storage import atomic_write_bytes
from simulations.children import stop_on_sigterm
from simulations.orthanc import OrthancConfig, OrthancServer
from simulations.pacs import run_pacs_demo

__all__ = ["PacsOptions", "pacs_app", "pull_from_options", "pull_with_progress"]

pacs_app = typer.Typer(help="The hospital's PACS over DICOMweb: run a local Orthanc, upload a DICOM folder, pull "
                       "labelled CT instances into the site's cache. Credentials: "
                       f"{PACS_USER_ENV} / {PACS_PASSWORD_ENV}.", no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web.")]


class PacsOptions:
    """The options ``train`` and ``scan`` take to read from a PACS instead of a folder."""

    URL = Annotated[str, typer.Option("--pacs", help="Read from this DICOMweb root instead of files (the "
                                                     "instances are cached in --data).")]
    LABELS = Annotated[Path | None, typer.Option("--pacs-labels", help="With --pacs: labels table "
                                                                       "(sop_instance_uid,label or "
                                                                       "study_instance_uid,label).")]
    STUDY = Annotated[str, typer.Option("--pacs-study", help="With --pacs: only this Study Instance UID.")]
    SERIES = Annotated[str, typer.Option("--pacs-series", help="With --pacs: only this Series Instance UID.")]


def pull_with_progress(source: PacsSource, cache: Path) -> SyncReport:
    """:func:`clients.pacs.sync` with a progress bar; prints what was skipped and why."""
    with progress_bar() as bar:
        task = bar.add_task(f"PACS → {cache}", total=None)
        report = sync(source, cache, progress=lambda done, total: bar.update(task, completed=done, total=total))
    for reason, count in skip_counts(report.skipped).items():  # a PACS holds far more than one labels table names
        console.print(f"[yellow]{count} instances skipped: {reason}")
    if report.skipped:
        console.print(f"each skipped instance and why: {cache / 'skipped.json'}")
    console.print(f"{report.instances} instances in {cache} ({report.fetched} retrieved now, {report.cached} "
                  f"already cached, {len(report.skipped)} skipped)")
    return report


@pacs_app.command()
def serve(
    folder: Annotated[Path, typer.Option(help="The PACS's folder: configuration, storage, logs (kept).")],
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1 (0 = a free one).")] = 0,
) -> None:
    """Run a local Orthanc with DICOMweb (loopback only, a generated password) until interrupted."""
    cfg = OrthancConfig(folder, http_port=port)
    env = folder / "credentials.env"
    with OrthancServer(cfg) as server:
        atomic_write_bytes(env, "".join(f"export {k}={v}\n" for k, v in server.env().items()).encode())
        env.chmod(0o600)
        out_console.print(f"DICOMweb at {cfg.dicomweb}; credentials in {env} (mode 600): `source {env}`; "
                          "Ctrl-C stops it")
        stop_on_sigterm()   # `kill` stops Orthanc too, as Ctrl-C does
        try:
            code = server.proc.wait() if server.proc is not None else 1
        except KeyboardInterrupt:
            code = 0
    if code:
        raise ConfigError(f"Orthanc exited with {code}: see {folder / 'logs'}")


@pacs_app.command()
def upload(
    folder: Annotated[Path, typer.Argument(help="A DICOM folder with labels.csv (file,label), e.g. a phantom site.")],
    url: UrlOption,
    labels_out: Annotated[Path, typer.Option(help="Where to write the labels keyed by SOP Instance UID.")],
) -> None:
    """Store a DICOM folder in a PACS (STOW-RS); write its labels table keyed by SOP Instance UID."""
    with progress_bar() as bar:
        task = bar.add_task(f"{folder} → PACS", total=None)
        n = upload_folder(folder, url, labels_out,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    out_console.print(f"stored {n} instances in {url}; labels by SOP Instance UID in {labels_out}")


@pacs_app.command()
def pull(
    url: UrlOption,
    labels: Annotated[Path, typer.Option(help="Labels table: sop_instance_uid,label or study_instance_uid,label.")],
    cache: Annotated[Path, typer.Option(help="The site's cache folder (a DICOM folder with labels.csv after).")],
    study: Annotated[str, typer.Option(help="Only this Study Instance UID.")] = "",
    series: Annotated[str, typer.Option(help="Only this Series Instance UID.")] = "",
    modality: Annotated[str, typer.Option(help="Modality to keep; others are reported as skipped.")] = "CT",
) -> None:
    """Copy the labelled instances of a PACS into the site's cache (resumable; whole files only)."""
    report = pull_with_progress(PacsSource(url, labels, study=study, series=series, modality=modality), cache)
    table = Table("cache", "instances", "retrieved now", "already cached", "skipped")
    table.add_row(str(cache), str(report.instances), str(report.fetched), str(report.cached), str(len(report.skipped)))
    out_console.print(table)



def pull_from_options(data: Path, url: str, labels: Path | None, study: str, series: str) -> SyncReport | None:
    """``--pacs`` given: pull its labelled instances into ``data`` (the cache) first; else nothing."""
    if not url:
        return None
    if labels is None:
        raise ConfigError("--pacs needs --pacs-labels: a table of sop_instance_uid,label or study_instance_uid,label")
    return pull_with_progress(PacsSource(url, labels, study=study, series=series), data)


@pacs_app.command()
def demo(
    data: Annotated[Path, typer.Option(help="A phantom hospital: site-1/, test/ and public/ (`privrad phantoms`).")],
    out: Annotated[Path, typer.Option(help="Folder for the PACS, the cache, the model, keys and pacs-demo.json.")],
    model: Annotated[Path | None, typer.Option(help="Classify with this checkpoint instead of training one "
                                                    "from the PACS.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs from the PACS.")] = 30,
    instances: Annotated[int, typer.Option(help="Test instances to classify under HE.")] = 2,
) -> None:
    """The PACS story: Orthanc holds the hospital, training reads from it, HE results go back as DICOM SRs."""
    s = run_pacs_demo(data, out, model=model, epochs=epochs, instances=instances, say=console.print)
    table = Table("instance (…last digits)", "true", "HE prediction", "SR read back: finding", "SR ε",
                  title=f"privrad: PACS {s.dicomweb}")
    for c in s.classified:
        table.add_row(c["sop_instance_uid"][-16:], c["true_label"], c["prediction"], c["sr_finding"],
                      c["sr_parameters"].get("dp_epsilon", "?"))
    out_console.print(table)
    for c in s.classified:
        out_console.print(f"SR of {c['sop_instance_uid']} stored at {c['sr_url']}", soft_wrap=True)
    out_console.print(f"the PACS is stopped; its studies and SRs stay in {out / 'pacs'}: "
                      f"`privrad pacs serve --folder {out / 'pacs'}` serves them again (on a new port)")
    out_console.print(f"{s.uploaded} instances stored in the PACS, {s.trained_from_pacs} trained on from it; model "
                      f"{s.model_sha256[:12]}…, test macro-AUC {s.test_macro_auc:.3f}; {s.seconds:.0f} s; "
                      f"{out / 'pacs-demo.json'}")
