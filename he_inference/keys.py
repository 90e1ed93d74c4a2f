"""Key material as types: the client's :class:`SecretKeys` and the server's :class:`PublicKeys`.

The split is structural. :class:`PublicKeys` has no field that could hold a secret key and
is built only from a ``public-keys`` container, which :meth:`SecretKeys.public_bytes`
writes with the relinearisation key and the Galois keys of the plan's rotation steps,
nothing else. Every server-side entry point calls :func:`require_public`, which refuses
anything that is not a :class:`PublicKeys` (a :class:`SecretKeys`, a TenSEAL context, a
raw SEAL secret key) with a :class:`KeyMaterialError`. Encryption is symmetric and
seeded (SEAL ships half of each fresh ciphertext as a PRNG seed), which halves the upload.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from federation.errors import CiphertextError, KeyMaterialError
from federation.storage import atomic_write_bytes
from he_inference.ckks import CKKSParams, make_context
from he_inference.passes.rotkeys import naf
from he_inference.serial import MAGIC, ContainerKind, pack, seal_load, seal_to_bytes, unpack

__all__ = [
    "INPUT_SCALE_REL_TOL", "PUBLIC_FILE", "SECRET_FILE", "PublicKeys", "SecretKeys", "check_input", "galois_elements",
    "key_id", "key_switches", "load_ciphertexts", "load_upload", "naf", "pack_ciphertexts", "power_of_two_steps",
    "require_keys_for", "require_public",
]

SECRET_FILE, PUBLIC_FILE = "secret.key", "public.keys"
INPUT_SCALE_REL_TOL = 1e-9   # a fresh encryption's scale is Δ = 2**scale_bits exactly; anything else is refused
Array = npt.NDArray[np.float64]


def galois_elements(steps: Sequence[int], poly_degree: int) -> list[int]:
    """SEAL's Galois element of each left rotation step (generator 3 modulo 2N).

    Passed as elements, never as steps: ``create_galois_keys(list[int])`` binds to the
    element overload, so steps given there would silently create the wrong keys.
    """
    slots, m = poly_degree // 2, 2 * poly_degree
    return sorted({pow(3, int(s) % slots, m) for s in steps})


def key_switches(step: int, elements: Collection[int], poly_degree: int) -> int | None:
    """Key switches SEAL's ``rotate_vector`` spends on ``step`` with Galois keys for ``elements``; None: it cannot.

    A step with its own key costs one. Otherwise SEAL rotates by each term of the step's
    non-adjacent form (skipping a term of ``slots``, the identity), each of which needs its
    own key (``Evaluator::rotate_internal``).
    """
    slots = poly_degree // 2
    if step % slots == 0:
        return 0
    have = set(elements)
    if galois_elements([step], poly_degree)[0] in have:
        return 1
    terms = [t for t in naf(step) if abs(t) != slots]
    if len(naf(step)) == 1 or any(galois_elements([t], poly_degree)[0] not in have for t in terms):
        return None
    return len(terms)   # the same count as passes.rotkeys.step_switches, from the keys as SEAL holds them


def power_of_two_steps(poly_degree: int) -> list[int]:
    """The rotations ``±2^k`` (k < log2 slots): Galois keys for these compose every step."""
    slots = poly_degree // 2
    return [s * (1 << k) for k in range(slots.bit_length() - 1) for s in (1, -1)]


def require_public(keys: object) -> PublicKeys:
    """``keys`` if it is server-side material; otherwise a KeyMaterialError naming what it is."""
    if isinstance(keys, PublicKeys):
        return keys
    if isinstance(keys, SecretKeys):
        raise KeyMaterialError("the server was handed the client's SecretKeys; it takes only PublicKeys "
                               "(SecretKeys.public() or the public.keys file)")
    if hasattr(keys, "is_private") and callable(keys.is_private):
        raise KeyMaterialError("the server takes privrad PublicKeys, not a TenSEAL context"
                               + (" (this one holds a secret key)" if keys.is_private() else ""))
    raise KeyMaterialError(f"the server takes privrad PublicKeys, got {type(keys).__name__}")


def require_keys_for(keys: object, params: CKKSParams, steps: Sequence[int]) -> PublicKeys:
    """``keys`` if they are public keys for ``params`` covering the rotation ``steps``; else a KeyMaterialError."""
    public = require_public(keys)
    if public.params != params:
        raise KeyMaterialError("these evaluation keys are for other CKKS parameters than the model's")
    public.require_steps(steps)
    return public


def key_id(public_blob: bytes) -> str:
    """A client's key id: the first 32 hex digits of the sha256 of its serialised evaluation keys."""
    return hashlib.sha256(public_blob).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKeys:
    """Evaluation keys (relinearisation + the plan's Galois keys) for one set of CKKS parameters."""

    params: CKKSParams
    context: seal.SEALContext
    relin: seal.RelinKeys
    galois: seal.GaloisKeys
    elements: tuple[int, ...]
    blob: bytes = field(repr=False)   # the serialised form, as received

    @property
    def nbytes(self) -> int:
        """Size of the serialised evaluation keys."""
        return len(self.blob)

    @classmethod
    def from_bytes(cls, data: bytes, params: CKKSParams, *, source: str = "<bytes>") -> PublicKeys:
        """Load a ``public-keys`` container; a secret key file is refused outright."""
        if data.startswith(MAGIC + ContainerKind.SECRET_KEYS.encode()):
            raise KeyMaterialError(f"{source} is the client's secret key file; the server takes only "
                                   f"the public evaluation keys ({PUBLIC_FILE})")
        head, parts = unpack(data, ContainerKind.PUBLIC_KEYS, source=source, params_sha256=params.digest())
        if set(parts) != {"relin", "galois"}:
            raise KeyMaterialError(f"{source}: unexpected key parts {sorted(parts)}")
        ctx = make_context(params)
        relin = seal_load(seal.RelinKeys, ctx, parts["relin"], what=f"{source} (relinearisation key)")
        galois = seal_load(seal.GaloisKeys, ctx, parts["galois"], what=f"{source} (Galois keys)")
        elements = tuple(int(e) for e in head["galois_elements"])
        missing = [e for e in elements if not galois.has_key(e)]
        if missing:
            raise CiphertextError(f"{source}: lists Galois elements it does not hold: {missing[:5]}")
        return cls(params, ctx, relin, galois, elements, bytes(data))

    @classmethod
    def load(cls, path: Path, params: CKKSParams) -> PublicKeys:
        """Read ``public.keys`` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            if (path / PUBLIC_FILE).is_file():
                path = path / PUBLIC_FILE
            elif (path / SECRET_FILE).is_file():
                raise KeyMaterialError(f"{path} holds a secret key and no {PUBLIC_FILE}; pass the public keys")
        if not path.is_file():
            raise KeyMaterialError(f"{path}: no such key file")
        return cls.from_bytes(path.read_bytes(), params, source=str(path))

    def require_steps(self, steps: Sequence[int]) -> None:
        """Refuse keys that cannot perform a rotation of the plan, with a key of its own or composed by SEAL."""
        missing = [s for s in steps if key_switches(s, self.elements, self.params.poly_degree) is None]
        if missing:
            raise KeyMaterialError(f"the evaluation keys lack {len(missing)} of the model's rotations: they were "
                                   "generated for another model (run `privrad he keygen` for this one)")


class SecretKeys:
    """The client's key set. Only :meth:`public_bytes` / :meth:`public` ever leave it."""

    def __init__(self, params: CKKSParams, context: seal.SEALContext, secret: seal.SecretKey,
                 public_blob: bytes) -> None:
        self.params, self._context, self._secret = params, context, secret
        self._public_blob = public_blob
        self._encoder = seal.CKKSEncoder(context)

    def __repr__(self) -> str:
        return f"SecretKeys(N={self.params.poly_degree}, params {self.params.digest()[:12]}…)"

    def __getstate__(self) -> Any:
        raise KeyMaterialError("SecretKeys cannot be pickled: the secret key never leaves the client "
                               "(save it with SecretKeys.save to the client's own disk)")

    # -- generation and storage ----------------------------------------------------------
    @classmethod
    def generate(cls, params: CKKSParams, steps: Sequence[int]) -> SecretKeys:
        """A fresh secret key and the public evaluation keys for the rotation ``steps`` (seeded, compact)."""
        ctx = make_context(params)
        keygen = seal.KeyGenerator(ctx)
        elements = galois_elements(steps, params.poly_degree)
        relin = seal_to_bytes(keygen.create_relin_keys())
        galois = seal_to_bytes(keygen.create_galois_keys(elements)) if elements else seal_to_bytes(seal.GaloisKeys())
        blob = pack(ContainerKind.PUBLIC_KEYS, [("relin", relin), ("galois", galois)], params_sha256=params.digest(),
                    galois_elements=elements, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return cls(params, ctx, keygen.secret_key(), blob)

    def public_bytes(self) -> bytes:
        """The server's share: evaluation keys only."""
        return self._public_blob

    def public(self) -> PublicKeys:
        """The evaluation keys as the server loads them."""
        return PublicKeys.from_bytes(self._public_blob, self.params, source="SecretKeys.public()")

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``secret.key`` (owner-only permissions) and ``public.keys`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        parts = [("secret", seal_to_bytes(self._secret)), ("public", self._public_blob)]
        secret = pack(ContainerKind.SECRET_KEYS, parts, params_sha256=self.params.digest(),
                      params=self.params.to_dict())
        spath, ppath = directory / SECRET_FILE, directory / PUBLIC_FILE
        atomic_write_bytes(spath, secret)
        os.chmod(spath, 0o600)
        atomic_write_bytes(ppath, self._public_blob)
        return spath, ppath

    @classmethod
    def load(cls, path: Path, params: CKKSParams | None = None) -> SecretKeys:
        """Read ``secret.key`` (or the key directory holding it); ``params`` default to the file's own."""
        path = Path(path)
        if path.is_dir():
            path = path / SECRET_FILE
        if not path.is_file():
            raise KeyMaterialError(f"{path}: no such secret key file (run `privrad he keygen`)")
        data = path.read_bytes()
        if params is None:
            head, _ = unpack(data, ContainerKind.SECRET_KEYS, source=str(path))
            params = CKKSParams.from_dict(head["params"])
        _, parts = unpack(data, ContainerKind.SECRET_KEYS, source=str(path), params_sha256=params.digest())
        ctx = make_context(params)
        secret = seal_load(seal.SecretKey, ctx, parts["secret"], what=f"{path} (secret key)")
        return cls(params, ctx, secret, parts["public"])

    # -- client-side encryption -----------------------------------------------------------
    def encrypt(self, vectors: Sequence[Array], *, model_sha256: str) -> bytes:
        """Seeded symmetric encryptions of packed slot vectors, bound to the params and the model."""
        encryptor = seal.Encryptor(self._context, self._secret)
        parts = []
        for n, v in enumerate(vectors):
            if len(v) != self.params.slots:
                raise CiphertextError(f"slot vector {n} has {len(v)} values, the ring has {self.params.slots} slots")
            pt = seal.Plaintext()
            self._encoder.encode(np.asarray(v, dtype=np.float64).tolist(), self.params.scale, pt)
            parts.append((f"ct{n}", seal_to_bytes(encryptor.encrypt_symmetric(pt))))
        return pack(ContainerKind.ENCRYPTED_IMAGE, parts, params_sha256=self.params.digest(), model_sha256=model_sha256)

    def decrypt(self, data: bytes, *, model_sha256: str | None, source: str = "<bytes>") -> Array:
        """The logits in an ``encrypted-logits`` container (slot 0 of each class's ciphertext).

        ``model_sha256`` None skips the model check (the container still names its model).
        """
        expect = {"model_sha256": model_sha256} if model_sha256 is not None else {}
        _, parts = unpack(data, ContainerKind.ENCRYPTED_LOGITS, source=source, params_sha256=self.params.digest(),
                          **expect)
        decryptor = seal.Decryptor(self._context, self._secret)
        out = []
        for name, blob in parts.items():
            ct = seal_load(seal.Ciphertext, self._context, blob, what=f"{source} ({name})")
            pt = seal.Plaintext()
            decryptor.decrypt(ct, pt)
            out.append(self._encoder.decode_double(pt)[0])
        return np.asarray(out)


def load_ciphertexts(data: bytes, kind: ContainerKind, params: CKKSParams, context: seal.SEALContext, *,
                     model_sha256: str, source: str = "<bytes>") -> list[seal.Ciphertext]:
    """The ciphertexts of a container (server side: input images; client side: logits)."""
    _, parts = unpack(data, kind, source=source, params_sha256=params.digest(), model_sha256=model_sha256)
    return [seal_load(seal.Ciphertext, context, blob, what=f"{source} ({name})") for name, blob in parts.items()]


def pack_ciphertexts(cts: Sequence[seal.Ciphertext], kind: ContainerKind, params: CKKSParams, *, model_sha256: str,
                     **header: Any) -> bytes:
    """Serialise ciphertexts into a container of ``kind``."""
    return pack(kind, [(f"ct{n}", seal_to_bytes(ct)) for n, ct in enumerate(cts)],
                params_sha256=params.digest(), model_sha256=model_sha256, **header)


def load_upload(data: bytes, params: CKKSParams, context: seal.SEALContext, *, model_sha256: str, n_inputs: int,
                source: str = "upload") -> list[seal.Ciphertext]:
    """The input ciphertexts of an ``encrypted-image`` container, every one checked before any work starts.

    The container must be bound to ``params`` and the model, hold exactly ``ct0`` …
    ``ct{n_inputs-1}`` in that order, and each part must be a ciphertext SEAL loads under
    ``context`` that :func:`check_input` accepts. The server's one entry for uploads: the
    one-process engine, the pool's coordinator and its workers all call it.

    Raises
    ------
    CiphertextError
        The first thing wrong, named (``"upload (ct0): size 3, expected 2 …"``).
    """
    _, parts = unpack(data, ContainerKind.ENCRYPTED_IMAGE, source=source, params_sha256=params.digest(),
                      model_sha256=model_sha256)
    names, want = list(parts), [f"ct{n}" for n in range(n_inputs)]
    if len(names) != n_inputs:
        raise CiphertextError(f"{source}: the model takes {n_inputs} ciphertexts, got {len(names)}")
    if names != want:
        raise CiphertextError(f"{source}: parts are named {[n[:16] for n in names[:4]]}, expected {want[:4]}")
    out = []
    for name, blob in parts.items():
        what = f"{source} ({name})"
        ct = seal_load(seal.Ciphertext, context, blob, what=what)
        check_input(ct, params, context, what=what)
        out.append(ct)
    return out


def check_input(ct: seal.Ciphertext, params: CKKSParams, context: seal.SEALContext, *, what: str) -> None:
    """Refuse a loaded ciphertext that is not a fresh encryption the model can take as its input.

    A fresh input has size 2, sits at the top of the modulus chain (the level the model's
    levels pass starts from), is in NTT form, is not transparent (it hides its values) and
    carries the scale Δ = 2**scale_bits (to :data:`INPUT_SCALE_REL_TOL`).

    Raises
    ------
    CiphertextError
        Names the property and the value found against the one expected.
    """
    if ct.size() != 2:
        raise CiphertextError(f"{what}: size {ct.size()}, expected 2 (a fresh or relinearised ciphertext)")
    top = context.first_context_data()
    if ct.parms_id() != top.parms_id():
        data = context.get_context_data(ct.parms_id())
        level = "an unknown level" if data is None else f"level {data.chain_index()}"
        raise CiphertextError(f"{what}: at {level}, the model takes its inputs at level {top.chain_index()}")
    if not ct.is_ntt_form():
        raise CiphertextError(f"{what}: not in NTT form, as every CKKS ciphertext is")
    if ct.is_transparent():
        raise CiphertextError(f"{what}: transparent (its mask part is zero: it does not hide the values)")
    scale = float(ct.scale)
    if not math.isfinite(scale) or abs(scale / params.scale - 1.0) > INPUT_SCALE_REL_TOL:
        raise CiphertextError(f"{what}: scale {scale:.6g}, expected 2^{params.scale_bits} = {params.scale:.6g}")
    if not seal.is_valid_for(ct, context):
        raise CiphertextError(f"{what}: SEAL finds it invalid for these parameters")
