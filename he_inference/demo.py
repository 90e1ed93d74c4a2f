"""The end of ``make demo``: the federated model classifies one encrypted slice through the service.

Compile the global model, start the encrypted-inference service on loopback, let a hospital
client (its own keys) encrypt one held-out slice, have the service classify it on ciphertext,
decrypt, and print the result beside the privacy spent in training and the timings.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.errors import DataError

__all__ = ["run_demo"]


def run_demo(run: Path, data: Path, out: Path, *, workers: int = 2,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Returns (and prints) the summary; the service is stopped on the way out."""
    from federation.ingest import Preprocess, load_dataset
    from federation.storage import atomic_write_json, load_checkpoint
    from he_inference.check import compile_checkpoint
    from he_inference.client import ServiceClient
    from he_inference.service import start_service

    model_pt = run / "global_model.pt"
    meta = load_checkpoint(model_pt).meta
    calib, source = None, "uniform noise"
    if (data / "public").is_dir():  # public images only: model.he (and its value ranges) goes to the server
        calib = load_dataset(data / "public", classes=meta["classes"],
                             preprocess=Preprocess(**meta["preprocess"])).images[:32].double().numpy()
        source = f"public: {len(calib)} images"
    t0 = time.perf_counter()
    compiled, _ = compile_checkpoint(model_pt, calibration=calib, calibration_source=source)
    he = out / "model.he"
    compiled.save(he)
    compile_s = time.perf_counter() - t0
    say(f"compiled {model_pt} → {he}: N={compiled.params.poly_degree}, depth {compiled.plan.depth} "
        f"({compile_s:.1f} s); starting the service …")
    labels = {row["file"]: row["label"] for row in csv.DictReader((data / "test" / "labels.csv").open())}
    if not labels:
        raise DataError(data / "test" / "labels.csv", "lists no slices")
    slice_name = sorted(labels)[0]
    t0 = time.perf_counter()
    proc, url = start_service(he, workers=workers)
    start_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        with ServiceClient(url, out / "keys") as client:
            keys_s = time.perf_counter() - t0
            result = client.classify_files([data / "test" / slice_name])[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    metrics: dict[str, Any] = {}
    if (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
    sites: dict[str, dict[str, Any]] = metrics.get("sites", {})
    eps = {site: v.get("epsilon") for site, v in sites.items()}
    summary = {
        "slice": slice_name, "true_label": labels[slice_name], "he_prediction": result["prediction"],
        "probabilities": result["probabilities"],
        "federated_macro_auc": metrics.get("final", {}).get("auc_macro"),
        "epsilon_spent_max": max((e for e in eps.values() if e is not None), default=None),
        "delta": next(iter(sites.values()), {}).get("delta"),
        "service_url": url, "service_start_s": start_s, "client_keygen_and_register_s": keys_s,
        "encrypted_round_trip_s": result["round_trip_s"], "server_s": result["server_s"],
        "upload_bytes": result["upload_bytes"], "download_bytes": result["download_bytes"],
    }
    atomic_write_json(out / "demo.json", summary)
    return summary
