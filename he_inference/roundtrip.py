"""Encrypted classifications with client and server in one process (no network), and their per-layer table.

What ``privrad he check`` and ``bench`` time: the client encrypts (seeded symmetric), the
server (public keys only, ``workers`` processes) runs the whole network on ciphertext, the
client decrypts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from he_inference.artifact import CompiledModel
from he_inference.client import decrypt_logits, encrypt_image
from he_inference.engine import LayerTiming
from he_inference.keys import SecretKeys
from he_inference.passes.ir import Array
from he_inference.passes.program import Kind
from he_inference.passes.rotkeys import layer_key_switches
from he_inference.server import InferenceServer

__all__ = ["LayerRow", "Measurement", "RoundTrip", "RoundTrips", "layer_table", "measure", "round_trips"]


@dataclass(frozen=True)
class RoundTrip:
    """One encrypted classification, client and server in one process (no network)."""

    logits: Array
    seconds: float          # client encrypt + server forward pass + client decrypt
    server_seconds: float
    layers: tuple[LayerTiming, ...]
    upload_bytes: int
    download_bytes: int


@dataclass(frozen=True)
class RoundTrips:
    """Several round trips through one server, and the seconds that server took to start (encode the model)."""

    trips: tuple[RoundTrip, ...]
    startup_seconds: float

    def __post_init__(self) -> None:
        if not self.trips:
            raise ValueError("`trips` is empty: at least one image is needed")


def round_trips(model: CompiledModel, keys: SecretKeys, images: Array, *, workers: int,
                say: Callable[[str], None]) -> RoundTrips:
    """Encrypt, classify on ciphertext and decrypt each image (N, C, H, W)."""
    trips = []
    with InferenceServer(model, keys.public(), workers=workers, progress=say) as server:
        for k, image in enumerate(images):
            t0 = time.perf_counter()
            upload = encrypt_image(model, keys, image)
            t1 = time.perf_counter()
            reply, layers = server.infer(upload)
            t2 = time.perf_counter()
            logits = decrypt_logits(model, keys, reply)
            trips.append(RoundTrip(logits, time.perf_counter() - t0, t2 - t1, tuple(layers), len(upload),
                                   len(reply)))
            say(f"{k + 1}/{len(images)}: server {t2 - t1:.2f} s, end to end {trips[-1].seconds:.2f} s")
        return RoundTrips(tuple(trips), server.encode_seconds)


@dataclass(frozen=True)
class Measurement:
    """A client's keys made, the plaintext model's logits, and the encrypted round trips of the same images."""

    keys: SecretKeys
    keygen_seconds: float
    reference: Array            # the PyTorch model's float32 logits (N, K), as float64
    run: RoundTrips

    @property
    def logits(self) -> Array:
        """The decrypted logits (N, K)."""
        return np.array([t.logits for t in self.run.trips])


def measure(model: CompiledModel, torch_model: nn.Module, images: Array, *, workers: int,
            say: Callable[[str], None]) -> Measurement:
    """Generate a client's keys (timed), classify ``images`` in plaintext and under encryption."""
    t0 = time.perf_counter()
    keys = SecretKeys.generate(model.params, model.key_steps)
    keygen_s = time.perf_counter() - t0
    with torch.no_grad():
        reference = torch_model(torch.as_tensor(images, dtype=torch.float32)).double().numpy()
    return Measurement(keys, keygen_s, reference, round_trips(model, keys, images, workers=workers, say=say))


@dataclass(frozen=True)
class LayerRow:
    """One layer over several runs: the median seconds and the operation counts (of one run)."""

    layer: str
    seconds_median: float
    counts: Mapping[Kind, int] = field(default_factory=dict)
    key_switches: int = 0   # the rotations' key switches (composed ones count each) and relinearisations

    def count(self, kind: Kind) -> int:
        """How many operations of ``kind`` the layer does (a masked product counts its masks)."""
        return int(self.counts.get(kind, 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``layer``, ``seconds_median``, then one key per instruction kind."""
        return {"layer": self.layer, "seconds_median": self.seconds_median,
                **{str(k): int(v) for k, v in self.counts.items()}, "key_switches": self.key_switches}


def layer_table(timings: Sequence[Sequence[LayerTiming]], model: CompiledModel | None = None
                ) -> tuple[LayerRow, ...]:
    """Median seconds and the operation counts per layer over several runs (key switches from ``model``'s plan)."""
    switches = layer_key_switches(model.plan, model.key_steps) if model is not None else (0,) * len(timings[0])
    return tuple(LayerRow(first.name, statistics.median(t[n].seconds for t in timings), dict(first.counts),
                          switches[n]) for n, first in enumerate(timings[0]))
