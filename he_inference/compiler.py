"""``compile_model``: a PyTorch Approx-CNN to a saved, self-contained CKKS inference plan.

Pure steps: trace and fold (:mod:`he_inference.ir`), check value ranges on calibration
images, plan the packing and schedule (:mod:`he_inference.plan`), pick the smallest
128-bit-secure ring for the depth (:mod:`he_inference.ckks`). The artifact (``.he``) holds
the plan, its masks (sparse), the CKKS parameters, the client's input transform and the
class names: it is loaded without PyTorch's model and is checked by a content hash.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from federation.errors import CiphertextError, DepthError, HEError
from federation.storage import atomic_write_bytes
from he_inference.ckks import MAX_BITS, CKKSParams, choose_params
from he_inference.ir import InputTransform, Network, Shape, trace, value_ranges
from he_inference.plan import Instr, Kind, LayerStats, Layout, Plan, build_plan

__all__ = ["ClientModel", "CompileOptions", "CompiledModel", "compile_model"]

FORMAT, VERSION = "privrad-he-model", 1
Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CompileOptions:
    """CKKS precision choices: the scale Δ = 2^scale_bits and integer headroom at the last level."""

    scale_bits: int = 40
    headroom_bits: int = 20
    range_margin: float = 4.0   # calibrated values may grow this much on unseen images


@dataclass
class CompiledModel:
    """Everything client and server need to run one model under CKKS."""

    params: CKKSParams
    plan: Plan
    image_shape: Shape
    transform: InputTransform
    classes: tuple[str, ...]
    calibrated_max: float
    meta: dict[str, Any] = field(default_factory=dict)   # e.g. the client's preprocessing, the source model
    _blob: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def digest(self) -> str:
        """sha256 of the ``.he`` file: ciphertexts are bound to it."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def pack(self, images: Array) -> list[Array]:
        """Slot vectors of one image (C, H, W) in [0, 1], ready to encode (client side)."""
        x = self.transform.apply(np.asarray(images, dtype=np.float64)[None])[0]
        return self.plan.input_layout.pack(x, self.params.slots)

    def client(self) -> ClientModel:
        """What a client needs to encrypt for this model and read its answer (no weights)."""
        return ClientModel(self.params, self.image_shape, self.transform, self.plan.input_layout, self.classes,
                           dict(self.meta), self.digest, tuple(self.plan.steps))

    # -- (de)serialisation -----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The ``.he`` file's content: a JSON header and the sparse masks, in one npz (built once)."""
        if self._blob is None:
            self._blob = self._serialise()
        return self._blob

    def _serialise(self) -> bytes:
        masks = self.plan.masks
        nz = [np.flatnonzero(m) for m in masks]
        header = {
            "format": FORMAT, "version": VERSION, "params": asdict(self.params), "params_sha256": self.params.digest(),
            "image_shape": list(self.image_shape), "transform": asdict(self.transform),
            "classes": list(self.classes), "calibrated_max": self.calibrated_max, "meta": self.meta,
            "plan": {
                "slots": self.plan.slots, "n_inputs": self.plan.n_inputs, "outputs": self.plan.outputs,
                "layers": self.plan.layers, "depth": self.plan.depth, "steps": self.plan.steps,
                "n_registers": self.plan.n_registers, "layout": _layout_dict(self.plan.input_layout),
                "instrs": [[str(i.kind), i.dst, list(i.srcs), list(i.masks), i.step] for i in self.plan.instrs],
                "stats": [asdict(s) for s in self.plan.stats],
            },
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            mask_len=np.array([len(i) for i in nz], dtype=np.int64),
            mask_idx=np.concatenate(nz).astype(np.int32) if nz else np.zeros(0, np.int32),
            mask_val=np.concatenate([m[i] for m, i in zip(masks, nz, strict=True)]) if nz else np.zeros(0))
        body = buf.getvalue()
        return hashlib.sha256(body).hexdigest().encode() + b"\n" + body

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's sha256."""
        data = self.to_bytes()
        atomic_write_bytes(Path(path), data)
        return hashlib.sha256(data).hexdigest()

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
        params = CKKSParams(header["params"]["poly_degree"], tuple(header["params"]["coeff_bits"]),
                            header["params"]["scale_bits"])
        if params.digest() != header["params_sha256"]:
            raise CiphertextError(f"{source}: parameter hash mismatch")
        p = header["plan"]
        slots = int(p["slots"])
        masks, start = [], 0
        idx, val = npz["mask_idx"], npz["mask_val"]
        for n in npz["mask_len"]:
            m = np.zeros(slots)
            m[idx[start:start + n]] = val[start:start + n]
            masks.append(m)
            start += int(n)
        instrs = [Instr(Kind(k), d, tuple(s), tuple(m), st) for k, d, s, m, st in p["instrs"]]
        plan = Plan(slots, _layout_from(p["layout"]), p["n_inputs"], instrs, masks, list(p["outputs"]),
                    [tuple(x) for x in p["layers"]], p["depth"], list(p["steps"]), p["n_registers"],
                    [LayerStats(**s) for s in p["stats"]])
        return cls(params, plan, tuple(header["image_shape"]), InputTransform(**header["transform"]),
                   tuple(header["classes"]), float(header["calibrated_max"]), dict(header.get("meta", {})), bytes(data))

    @classmethod
    def load(cls, path: Path) -> CompiledModel:
        """Read a ``.he`` file."""
        path = Path(path)
        if not path.is_file():
            raise CiphertextError(f"{path}: no such HE model file")
        return cls.from_bytes(path.read_bytes(), source=str(path))


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

    def pack(self, images: Array) -> list[Array]:
        """Slot vectors of one image (C, H, W) in [0, 1], ready to encode."""
        x = self.transform.apply(np.asarray(images, dtype=np.float64)[None])[0]
        return self.input_layout.pack(x, self.params.slots)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"params": asdict(self.params), "params_sha256": self.params.digest(),
                "image_shape": list(self.image_shape), "transform": asdict(self.transform),
                "input_layout": _layout_dict(self.input_layout), "classes": list(self.classes), "meta": self.meta,
                "model_sha256": self.digest, "rotation_steps": list(self.steps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientModel:
        """Inverse of :meth:`to_dict`; a parameter hash that does not match is a CiphertextError."""
        try:
            p = d["params"]
            params = CKKSParams(int(p["poly_degree"]), tuple(int(b) for b in p["coeff_bits"]), int(p["scale_bits"]))
            if params.digest() != d["params_sha256"]:
                raise CiphertextError("model description: parameter hash mismatch")
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


def compile_model(model: nn.Module | Network, *, options: CompileOptions | None = None,
                  calibration: Array | None = None, image_shape: Shape | None = None,
                  meta: dict[str, Any] | None = None) -> CompiledModel:
    """Compile ``model`` (not modified) for encrypted inference.

    ``calibration`` (N, C, H, W in [0, 1]) bounds the values every layer sees; default:
    uniform noise images.

    Raises
    ------
    UnsupportedLayerError
        A layer has no CKKS equivalent (named).
    DepthError
        The network is deeper than any 128-bit ring allows (depth needed vs available).
    HEError
        Calibrated values would overflow the CKKS headroom.
    """
    options = options or CompileOptions()
    net = model if isinstance(model, Network) else trace(model, image_shape=image_shape)
    ranges = value_ranges(net, calibration)  # op inputs, classifier input, logits
    worst = max(ranges) * options.range_margin
    limit = 2.0 ** (options.headroom_bits - 1)
    if worst >= limit:
        at = int(np.argmax(ranges))
        name = net.ops[at].name if at < len(net.ops) else net.dense.name
        raise HEError(f"values reach {max(ranges):.3g} at {name} on the calibration images; with margin "
                      f"{options.range_margin} that exceeds the CKKS headroom 2^{options.headroom_bits - 1}: "
                      "raise headroom_bits or lower scale_bits")
    last: DepthError | None = None
    for n in MAX_BITS:  # smallest ring first; a deeper or wider network moves up
        try:
            plan = build_plan(net, slots=n // 2, ranges=ranges)
        except DepthError as exc:  # a channel does not fit in n/2 slots
            last = exc
            continue
        params = choose_params(plan.depth, min_slots=n // 2, scale_bits=options.scale_bits,
                               headroom_bits=options.headroom_bits)
        if params.slots == n // 2:
            return CompiledModel(params, plan, net.image_shape, net.transform, net.classes, max(ranges),
                                 dict(meta or {}))
    assert last is not None
    raise last
