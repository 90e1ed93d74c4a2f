"""CKKS parameters for a depth at 128-bit security, and SEAL contexts built from them.

The coefficient modulus is ``[first] + [scale] * depth + [special]`` bits; the largest total
each ring degree allows at 128-bit classical security is the HE standard's (as SEAL
enforces): 218 bits for N = 8192, 438 for 16384, 881 for 32768. ``first`` leaves
``first - scale`` bits of integer headroom for the logits at the last level.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import tenseal.sealapi as seal

from federation.errors import DepthError

__all__ = ["MAX_BITS", "CKKSParams", "choose_params", "make_context"]

MAX_BITS = {8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CKKSParams:
    """Ring degree, coefficient modulus bit sizes and scale of a CKKS context."""

    poly_degree: int
    coeff_bits: tuple[int, ...]
    scale_bits: int

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
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


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
