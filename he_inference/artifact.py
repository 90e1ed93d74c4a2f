r"""The compiled model in memory (:class:`CompiledModel`) and as the ``.he`` file, and the client's view of it.

The ``.he`` file is ``<sha256 of the body>\\n<body>``; the body is one npz holding a JSON
header (format, version, the CKKS parameters and their hash, image shape, input transform,
classes, calibrated maximum, meta, and the plan: slots, inputs, outputs, layer spans,
depth, rotation steps, registers, input layout, instructions, per-layer stats) and the
plan's masks, stored sparse. It is loaded without PyTorch's model and checked by its hash.
Levels and costs are not trusted from the file: they are derived again by their passes.
:class:`ClientModel` is what the inference service hands a client (``GET /model``): how to
pack and for which parameters to encrypt, with no weights. The wire format of keys and
ciphertexts is :mod:`he_inference.serial`.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import CiphertextError
from federation.storage import atomic_write_bytes
from he_inference.ckks import CKKSParams, chain_primes
from he_inference.passes.cost import LayerStats, layer_stats
from he_inference.passes.ir import Array, InputTransform, Shape
from he_inference.passes.layout import Layout, pack_image
from he_inference.passes.levels import LevelAssignment, assign_levels, plan_depth, register_depths
from he_inference.passes.program import Instr, Kind, LayerSpan, Plan
from he_inference.passes.rotkeys import key_switches_per_pass, step_switches

__all__ = ["FORMAT", "VERSION", "ClientModel", "CompiledModel", "MetaKey", "derive_levels"]

FORMAT, VERSION = "privrad-he-model", 1


class MetaKey(enum.StrEnum):
    """The keys of a compiled model's ``meta`` that privrad writes and reads."""

    PREPROCESS = "preprocess"          # the checkpoint's Preprocess fields: the client reads images as in training
    SOURCE = "source"                  # the checkpoint's path
    SOURCE_SHA256 = "source_sha256"    # the checkpoint's sha256
    CALIBRATION = "calibration"        # what the value ranges were measured on
    PRIVACY = "privacy"                # the checkpoint's privacy record: {"dp", "epsilon_max", "delta"}, if any


def derive_levels(plan: Plan, params: CKKSParams) -> LevelAssignment:
    """The levels pass on the chain of ``params``."""
    return assign_levels(plan, primes=chain_primes(params), scale=params.scale)


@dataclass(frozen=True)
class CompiledModel:
    """Everything client and server need to run one model under CKKS.

    ``levels`` (the levels pass) and ``stats`` (the cost pass) are derived from ``plan`` and
    ``params``; every engine evaluates with ``levels``.
    """

    params: CKKSParams
    plan: Plan
    levels: LevelAssignment
    stats: tuple[LayerStats, ...]
    image_shape: Shape
    transform: InputTransform
    classes: tuple[str, ...]
    calibrated_max: float
    meta: dict[str, Any] = field(default_factory=dict)   # see MetaKey: the client's preprocessing, the source, …
    blob: bytes | None = field(default=None, repr=False, compare=False)   # the file's bytes, when loaded from one
    key_steps: tuple[int, ...] = ()   # the steps with a Galois key of their own (empty: every step of the plan)

    def __post_init__(self) -> None:
        if not self.key_steps:
            object.__setattr__(self, "key_steps", self.plan.steps)
        bad = [s for s in self.plan.steps if step_switches(s, self.key_steps, self.plan.slots) is None]
        if bad:
            raise ValueError(f"`key_steps` cannot compose the plan's rotation steps {bad[:5]}")
        if len(self.levels.operand_level) != len(self.plan.instrs) or self.levels.top != self.params.depth:
            raise ValueError("`levels` must be the level assignment of `plan` on the chain of `params`")
        if len(self.stats) != len(self.plan.layers):
            raise ValueError(f"`stats` must hold one entry per layer ({len(self.plan.layers)}), got {len(self.stats)}")
        if self.plan.slots != self.params.slots:
            raise ValueError(f"`plan` is packed for {self.plan.slots} slots, `params` give {self.params.slots}")

    @classmethod
    def assemble(cls, params: CKKSParams, plan: Plan, *, image_shape: Shape, transform: InputTransform,
                 classes: tuple[str, ...], calibrated_max: float, meta: dict[str, Any] | None = None,
                 blob: bytes | None = None, key_steps: tuple[int, ...] = ()) -> CompiledModel:
        """A model from its plan: levels and stats derived by their passes."""
        return cls(params, plan, derive_levels(plan, params), layer_stats(plan, register_depths(plan)), image_shape,
                   transform, classes, calibrated_max, dict(meta or {}), blob, tuple(key_steps))

    @cached_property
    def plaintext_bytes(self) -> int:
        """Memory the engine's encoded plaintexts take: N 8-byte words per prime of each one's level."""
        return self.plaintext_bytes_of(range(len(self.plan.instrs)))

    def plaintext_bytes_of(self, instrs: Iterable[int]) -> int:
        """:attr:`plaintext_bytes` of the instructions ``instrs`` only (one worker's share)."""
        n = self.params.poly_degree
        return sum(8 * n * (level + 1) for i in instrs for level, _ in self.levels.mask_at[i])

    @property
    def key_switches(self) -> int:
        """Key switches one encrypted forward pass spends (more than its rotations when steps share keys)."""
        return key_switches_per_pass(self.plan, self.key_steps)

    @property
    def depth(self) -> int:
        """The multiplicative depth the plan uses."""
        return self.levels.depth

    @cached_property
    def digest(self) -> str:
        """sha256 of the ``.he`` file: ciphertexts are bound to it."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def pack(self, image: Array) -> list[Array]:
        """Slot vectors of one image (C, H, W) in [0, 1], ready to encode (client side)."""
        return pack_image(image, self.transform, self.plan.input_layout, self.params.slots)

    def client(self) -> ClientModel:
        """What a client needs to encrypt for this model and read its answer (no weights)."""
        return ClientModel(self.params, self.image_shape, self.transform, self.plan.input_layout, self.classes,
                           dict(self.meta), self.digest, self.key_steps)

    # -- the .he file ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The ``.he`` file's content (built once)."""
        return self._bytes

    @cached_property
    def _bytes(self) -> bytes:
        return self.blob if self.blob is not None else _serialise(self)

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's sha256."""
        atomic_write_bytes(Path(path), self.to_bytes())
        return self.digest

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> CompiledModel:
        """Inverse of :meth:`to_bytes`; a tampered or foreign file is a :class:`CiphertextError`."""
        digest, _, body = data.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise CiphertextError(f"{source}: not a privrad HE model, or its content does not match its hash")
        try:
            npz = np.load(io.BytesIO(body), allow_pickle=False)
            header = json.loads(npz["header"].tobytes())
        except (ValueError, KeyError, OSError) as exc:
            raise CiphertextError(f"{source}: unreadable HE model ({exc})") from exc
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise CiphertextError(f"{source}: format {header.get('format')} v{header.get('version')}, expected "
                                  f"{FORMAT} v{VERSION}")
        params = CKKSParams.from_dict(header["params"], sha256=header["params_sha256"], source=source)
        try:
            plan = _plan_from(header["plan"], npz["mask_len"], npz["mask_idx"], npz["mask_val"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CiphertextError(f"{source}: malformed plan ({exc})") from exc
        p = header["plan"]
        if (p["n_inputs"], tuple(p["steps"]), p["depth"]) != (plan.n_inputs, plan.steps, plan_depth(plan)):
            raise CiphertextError(f"{source}: the header's inputs, rotation steps or depth do not match its plan")
        try:
            key_steps = tuple(int(k) for k in p.get("key_steps", ()))
            return cls.assemble(params, plan, image_shape=tuple(header["image_shape"]),
                                transform=InputTransform(**header["transform"]), classes=tuple(header["classes"]),
                                calibrated_max=float(header["calibrated_max"]), meta=dict(header.get("meta", {})),
                                blob=bytes(data), key_steps=key_steps)
        except (ValueError, TypeError) as exc:
            raise CiphertextError(f"{source}: malformed model ({exc})") from exc

    @classmethod
    def load(cls, path: Path) -> CompiledModel:
        """Read a ``.he`` file."""
        path = Path(path)
        if not path.is_file():
            raise CiphertextError(f"{path}: no such HE model file")
        return cls.from_bytes(path.read_bytes(), source=str(path))


def _serialise(model: CompiledModel) -> bytes:
    plan = model.plan
    nz = [np.flatnonzero(m) for m in plan.masks]
    header = {
        "format": FORMAT, "version": VERSION, "params": model.params.to_dict(), "params_sha256": model.params.digest(),
        "image_shape": list(model.image_shape), "transform": asdict(model.transform),
        "classes": list(model.classes), "calibrated_max": model.calibrated_max, "meta": model.meta,
        "plan": {
            "slots": plan.slots, "n_inputs": plan.n_inputs, "outputs": list(plan.outputs),
            "layers": [list(span) for span in plan.layers], "depth": plan_depth(plan), "steps": list(plan.steps),
            "n_registers": plan.n_registers, "layout": _layout_dict(plan.input_layout),
            "instrs": [[str(i.kind), i.dst, list(i.srcs), list(i.masks), i.step] for i in plan.instrs],
            "stats": [asdict(s) for s in model.stats],
        },
    }
    if model.key_steps != plan.steps:   # written only for a key budget: files without one are byte-identical
        header["plan"]["key_steps"] = list(model.key_steps)   # type: ignore[index]
    buf = io.BytesIO()
    np.savez_compressed(
        buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        mask_len=np.array([len(i) for i in nz], dtype=np.int64),
        mask_idx=np.concatenate(nz).astype(np.int32) if nz else np.zeros(0, np.int32),
        mask_val=np.concatenate([m[i] for m, i in zip(plan.masks, nz, strict=True)]) if nz else np.zeros(0))
    body = buf.getvalue()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _plan_from(p: dict[str, Any], lengths: Any, idx: Any, val: Any) -> Plan:
    slots = int(p["slots"])
    masks, start = [], 0
    for n in lengths:
        m = np.zeros(slots)
        m[idx[start:start + n]] = val[start:start + n]
        masks.append(m)
        start += int(n)
    instrs = tuple(Instr(Kind(k), d, tuple(s), tuple(m), st) for k, d, s, m, st in p["instrs"])
    return Plan(slots, _layout_from(p["layout"]), instrs, tuple(masks), tuple(p["outputs"]),
                tuple(LayerSpan(str(n), int(s), int(e)) for n, s, e in p["layers"]), int(p["n_registers"]))


@dataclass(frozen=True)
class ClientModel:
    """The client's view of a compiled model: packing, parameters, classes; no weights.

    Served by the encrypted-inference service (``GET /model``) so a hospital can encrypt
    without holding the ``.he`` file.
    """

    params: CKKSParams
    image_shape: Shape
    transform: InputTransform
    input_layout: Layout
    classes: tuple[str, ...]
    meta: dict[str, Any]
    digest: str
    steps: tuple[int, ...]

    def pack(self, image: Array) -> list[Array]:
        """Slot vectors of one image (C, H, W) in [0, 1], ready to encode."""
        return pack_image(image, self.transform, self.input_layout, self.params.slots)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"params": self.params.to_dict(), "params_sha256": self.params.digest(),
                "image_shape": list(self.image_shape), "transform": asdict(self.transform),
                "input_layout": _layout_dict(self.input_layout), "classes": list(self.classes), "meta": self.meta,
                "model_sha256": self.digest, "rotation_steps": list(self.steps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientModel:
        """Inverse of :meth:`to_dict`; a parameter hash that does not match is a CiphertextError."""
        try:
            params = CKKSParams.from_dict(d["params"], sha256=d["params_sha256"], source="model description")
            return cls(params, tuple(d["image_shape"]), InputTransform(**d["transform"]),
                       _layout_from(d["input_layout"]), tuple(d["classes"]), dict(d.get("meta", {})),
                       str(d["model_sha256"]), tuple(int(x) for x in d["rotation_steps"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CiphertextError(f"model description is incomplete or malformed ({exc})") from exc


def _layout_dict(lay: Layout) -> dict[str, Any]:
    return {"shape": list(lay.shape), "gap": list(lay.gap), "row": lay.row, "ct": list(lay.ct),
            "offset": list(lay.offset)}


def _layout_from(d: dict[str, Any]) -> Layout:
    return Layout(tuple(d["shape"]), tuple(d["gap"]), d["row"], tuple(d["ct"]), tuple(d["offset"]))
