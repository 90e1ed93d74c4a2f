"""CKKS parameters for a depth at 128-bit security, and SEAL contexts built from them.

The coefficient modulus is ``[first] + [scale] * depth + [special]`` bits; the largest total
each ring degree allows at 128-bit classical security is the HE standard's (as SEAL
enforces): 218 bits for N = 8192, 438 for 16384, 881 for 32768. ``first`` leaves
``first - scale`` bits of integer headroom for the logits at the last level.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import tenseal.sealapi as seal

from federation.errors import CiphertextError, DepthError

__all__ = ["MAX_BITS", "CKKSParams", "chain_primes", "choose_params", "make_context"]

MAX_BITS = {8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CKKSParams:
    """Ring degree, coefficient modulus bit sizes and scale of a CKKS context."""

    poly_degree: int
    coeff_bits: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        if self.poly_degree < 2 or self.poly_degree & (self.poly_degree - 1):
            raise ValueError(f"`poly_degree` must be a power of two, got {self.poly_degree}")
        if len(self.coeff_bits) < 2 or not all(0 < b <= 60 for b in self.coeff_bits):
            raise ValueError(f"`coeff_bits` must list at least two primes of 1 to 60 bits, got {self.coeff_bits}")
        if not 0 < self.scale_bits <= 60:
            raise ValueError(f"`scale_bits` must be 1 to 60, got {self.scale_bits}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (as every header carries it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, sha256: str | None = None, source: str = "parameters") -> CKKSParams:
        """Inverse of :meth:`to_dict`; with ``sha256``, a parameter hash that differs is a CiphertextError.

        Raises
        ------
        KeyError, TypeError, ValueError
            A field is missing or malformed.
        CiphertextError
            The parameters do not hash to ``sha256``.
        """
        params = cls(int(d["poly_degree"]), tuple(int(b) for b in d["coeff_bits"]), int(d["scale_bits"]))
        if sha256 is not None and params.digest() != sha256:
            raise CiphertextError(f"{source}: parameter hash mismatch")
        return params

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_degree // 2

    @property
    def depth(self) -> int:
        """Rescales available."""
        return len(self.coeff_bits) - 2

    @property
    def scale(self) -> float:
        """The encoding scale Δ."""
        return float(2**self.scale_bits)

    def digest(self) -> str:
        """sha256 of the parameters: every serialised object carries it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def choose_params(depth: int, *, min_slots: int = 0, scale_bits: int = 40, headroom_bits: int = 20) -> CKKSParams:
    """The smallest 128-bit-secure ring with ``depth`` levels and at least ``min_slots`` slots.

    Raises
    ------
    DepthError
        No ring allows the depth; the message gives the depth needed and the largest available.
    """
    first = scale_bits + headroom_bits
    if first > 60:
        raise DepthError(f"scale {scale_bits} bits + headroom {headroom_bits} bits exceeds SEAL's 60-bit primes")
    for n, max_bits in MAX_BITS.items():
        bits = (first, *([scale_bits] * depth), first)
        if sum(bits) <= max_bits and n // 2 >= min_slots:
            return CKKSParams(n, bits, scale_bits)
    largest = (MAX_BITS[32768] - 2 * first) // scale_bits
    raise DepthError(f"the network needs multiplicative depth {depth}; the largest 128-bit ring (N=32768, "
                     f"{MAX_BITS[32768]} bits) allows {largest} at a {scale_bits}-bit scale")


def make_context(params: CKKSParams) -> seal.SEALContext:
    """A SEAL CKKS context at 128-bit security (SEAL refuses an insecure one)."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_degree, list(params.coeff_bits)))
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise DepthError(f"SEAL rejects {params}: {ctx.parameters_error_message()}")
    return ctx


def chain_primes(params: CKKSParams) -> tuple[int, ...]:
    """The data primes of the coefficient modulus, bottom of the chain first (the special prime left out).

    A rescale at level ``l`` divides by the ``l``-th of them; SEAL picks the same primes for
    the same parameters, so this is what every context built by :func:`make_context` uses.
    """
    moduli = seal.CoeffModulus.Create(params.poly_degree, list(params.coeff_bits))
    return tuple(int(m.value()) for m in moduli[:-1])
