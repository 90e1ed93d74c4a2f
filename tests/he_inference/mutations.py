"""Mutated ``encrypted-image`` uploads, for fuzzing whatever takes uploads (the server, the pool, the HTTP service).

:func:`mutated_uploads` derives, from one good upload, uploads an attacker can send: every one
carries a header that passes the cheap checks where the mutation is meant to reach SEAL (right
parameter and model hashes, a recomputed body hash). Each comes with a label naming the
mutation. Every one must be refused with a named error, except those labelled in
:data:`MAY_DECODE`: a CKKS ciphertext is malleable, so a byte flip in its coefficients can
give a valid ciphertext of other values, which no server-side check can tell from a real one
(the server must then answer it like any other upload).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator

import numpy as np
import tenseal.sealapi as seal

from he_inference.artifact import CompiledModel
from he_inference.ckks import CKKSParams, make_context
from he_inference.keys import SecretKeys
from he_inference.serial import MAGIC, VERSION, ContainerKind, pack, seal_load, seal_to_bytes, unpack

MAY_DECODE = frozenset({"byte-flip"})
DEEP_NESTING = 100_000                      # far beyond Python's recursion limit
SEAL_HEADER_BYTES = 16                      # SEAL's serialisation header (magic, version, compression, size)
HEAD_FLIP_BYTES = 256                       # byte flips land here half of the time: header and metadata
OTHER_PARAMS = (CKKSParams(8192, (60, 40, 40, 60), 40), CKKSParams(8192, (50, 30, 30, 30, 50), 30))

Mutation = Callable[[random.Random], bytes]


def mutated_uploads(good: bytes, model: CompiledModel, keys: SecretKeys, n: int, seed: int
                    ) -> Iterator[tuple[str, bytes]]:
    """``n`` (label, upload) pairs derived from ``good`` (an upload for ``model`` under ``keys``), seeded.

    The mutations cycle in a shuffled order, so any ``n`` ≥ the number of kinds covers each.
    """
    rng = random.Random(seed)
    kinds = sorted(_mutations(good, model, keys).items())
    for i in range(n):
        if i % len(kinds) == 0:
            rng.shuffle(kinds)
        label, make = kinds[i % len(kinds)]
        yield label, make(rng)


def _mutations(good: bytes, model: CompiledModel, keys: SecretKeys) -> dict[str, Mutation]:
    head, parts = unpack(good, ContainerKind.ENCRYPTED_IMAGE)
    hashes = {"params_sha256": head["params_sha256"], "model_sha256": head["model_sha256"]}
    names = list(parts)
    ctx = make_context(model.params)
    cts = [seal_load(seal.Ciphertext, ctx, parts[name], what=name) for name in names]
    ev = seal.Evaluator(ctx)

    def container(items: list[tuple[str, bytes]]) -> bytes:
        return pack(ContainerKind.ENCRYPTED_IMAGE, items, **hashes)

    def replace_one(rng: random.Random, blob: bytes) -> bytes:
        k = rng.randrange(len(names))
        return container([(name, blob if i == k else parts[name]) for i, name in enumerate(names)])

    def derived(op: Callable[[seal.Ciphertext], seal.Ciphertext]) -> Mutation:
        blobs = [seal_to_bytes(op(ct)) for ct in cts]
        return lambda rng: replace_one(rng, blobs[rng.randrange(len(blobs))])

    def mod_switched(ct: seal.Ciphertext) -> seal.Ciphertext:
        out = seal.Ciphertext()
        ev.mod_switch_to_next(ct, out)
        return out

    def to_bottom(ct: seal.Ciphertext) -> seal.Ciphertext:
        # An evaluated ciphertext is no longer seeded (twice the bytes): at the bottom level it still
        # fits the service's size bound for a seeded upload, so these variants reach SEAL's checks there
        out = seal.Ciphertext()
        ev.mod_switch_to(ct, ctx.last_parms_id(), out)
        return out

    def grown(ct: seal.Ciphertext) -> seal.Ciphertext:   # size 3 at the bottom (a product would overflow it)
        out = to_bottom(ct)
        out.resize(ctx, 3)
        return out

    def squared(ct: seal.Ciphertext) -> seal.Ciphertext:   # size 3: no relinearisation
        out = seal.Ciphertext()
        ev.multiply(ct, ct, out)
        return out

    def rescaled(factor: float) -> Callable[[seal.Ciphertext], seal.Ciphertext]:
        def op(ct: seal.Ciphertext) -> seal.Ciphertext:
            out = seal_load(seal.Ciphertext, ctx, seal_to_bytes(ct), what="copy")
            out.scale = ct.scale * factor
            return out
        return op

    def zero(_: seal.Ciphertext) -> seal.Ciphertext:   # a zero ciphertext: not in NTT form, transparent
        out = seal.Ciphertext(ctx)
        out.resize(ctx, 2)
        out.scale = model.params.scale
        return out

    foreign = _foreign_blobs(model.params)
    template = parts[names[0]]

    def junk(rng: random.Random) -> bytes:
        return replace_one(rng, rng.randbytes(rng.choice([0, 1, 15, 64, 4096, len(template)])))

    def junk_behind_header(rng: random.Random) -> bytes:
        return replace_one(rng, template[:SEAL_HEADER_BYTES] + rng.randbytes(rng.randrange(1, len(template))))

    def truncated(rng: random.Random) -> bytes:
        return replace_one(rng, template[:rng.randrange(1, len(template))])

    def byte_flip(rng: random.Random) -> bytes:
        blob = bytearray(template)
        span = HEAD_FLIP_BYTES if rng.random() < 0.5 else len(blob)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(min(span, len(blob)))] ^= 1 << rng.randrange(8)
        return replace_one(rng, bytes(blob))

    def extra(rng: random.Random) -> bytes:
        items = [(name, parts[name]) for name in names]
        return container([*items, *[(f"ct{len(items) + i}", template) for i in range(rng.randint(1, 2))]])

    def missing(rng: random.Random) -> bytes:
        items = [(name, parts[name]) for name in names]
        return container(items[:rng.randrange(len(items))])

    def renamed(rng: random.Random) -> bytes:
        new = rng.choice(["ct9", "x", "", "CT0", "ct0 ", "../ct0"])
        return container([(new if i == 0 else name, parts[name]) for i, name in enumerate(names)])

    def repeated(rng: random.Random) -> bytes:
        return container([(names[0], parts[names[0]]), *[(name, parts[name]) for name in names]])

    def header(rng: random.Random) -> bytes:
        body = b"".join(parts.values())
        line = rng.choice(_bad_headers(hashes, names, body))
        return MAGIC + f"{ContainerKind.ENCRYPTED_IMAGE} v{VERSION}\n".encode() + line + b"\n" + body

    def first_line(rng: random.Random) -> bytes:
        rest = good[good.index(b"\n"):]
        lines = [MAGIC + b"encrypted-logits v1", MAGIC + b"encrypted-image v2", b"PRIVRAD-XX encrypted-image v1",
                 MAGIC + b"\xff\xfe v1", b""]
        return rng.choice(lines) + rest

    return {
        "junk-part": junk, "junk-behind-seal-header": junk_behind_header, "truncated-part": truncated,
        "byte-flip": byte_flip, "extra-part": extra, "missing-part": missing, "renamed-part": renamed,
        "repeated-part": repeated, "bad-header": header, "bad-first-line": first_line,
        "wrong-level": derived(mod_switched), "size-3": derived(squared), "scale-doubled": derived(rescaled(2.0)),
        "scale-nan": derived(rescaled(float("nan"))), "zero-ciphertext": derived(zero),
        "wrong-level-bottom": derived(to_bottom), "size-3-bottom": derived(grown),
        "other-params": lambda rng: replace_one(rng, rng.choice(foreign)),
    }


def _foreign_blobs(params: CKKSParams) -> list[bytes]:
    """Fresh ciphertexts made under other CKKS parameters than ``params``."""
    out = []
    for other in OTHER_PARAMS:
        if other == params:
            continue
        keys = SecretKeys.generate(other, [])
        _, parts = unpack(keys.encrypt([np.zeros(other.slots)], model_sha256="x"), ContainerKind.ENCRYPTED_IMAGE)
        out.extend(parts.values())
    return out


def _bad_headers(hashes: dict[str, str], names: list[str], body: bytes) -> list[bytes]:
    """Header lines of the wrong shape or types (the body hash is right where the field is there at all)."""
    digest = hashlib.sha256(body).hexdigest()
    size = len(body)
    good = {**hashes, "parts": [[names[0], size]], "body_sha256": digest}
    variants: list[object] = [
        "[" * DEEP_NESTING + "]" * DEEP_NESTING, "{\"a\":" * DEEP_NESTING + "1" + "}" * DEEP_NESTING,
        [1, 2], "a string", None, 3.5,
        {**good, "parts": "ct0"}, {**good, "parts": {"ct0": size}}, {**good, "parts": [[names[0]]]},
        {**good, "parts": [[0, size]]}, {**good, "parts": [[names[0], str(size)]]},
        {**good, "parts": [[names[0], -1], ["ct1", size + 1]]}, {**good, "parts": [[names[0], True]]},
        {**good, "parts": [[names[0], float(size)]]}, {**good, "parts": [[names[0], size, 1]]},
        {**good, "body_sha256": 7}, {**good, "params_sha256": [hashes["params_sha256"]]},
        {**good, "model_sha256": {"x": 1}}, {k: v for k, v in good.items() if k != "parts"},
    ]
    lines = [v.encode() if isinstance(v, str) and v.startswith(("[", "{")) else json.dumps(v).encode()
             for v in variants]
    lines.append(json.dumps({**good, "parts": [[names[0], 1]]}).replace("1]]", "1e400]]").encode())  # Infinity
    lines.append(b"{\"parts\": NaN}")
    lines.append(b"\xff\xfe not json")
    return lines
