"""CKKS parameters: the ring for a depth, their JSON form, and the primes SEAL picks."""

from __future__ import annotations

import pytest

from federation.errors import CiphertextError, DepthError
from he_inference.ckks import CKKSParams, chain_primes, choose_params, make_context


def test_a_network_deeper_than_any_ring_is_refused_with_the_figures() -> None:
    with pytest.raises(DepthError, match=r"needs multiplicative depth 30; .*\(N=32768, 881 bits\) allows 19"):
        choose_params(30)


def test_the_ring_is_the_smallest_that_holds_the_depth() -> None:
    assert choose_params(2).poly_degree == 8192
    assert choose_params(7).poly_degree == 16384
    assert choose_params(8).poly_degree == 32768


def test_parameters_round_trip_through_their_json_form_and_hash() -> None:
    params = choose_params(7)

    again = CKKSParams.from_dict(params.to_dict(), sha256=params.digest())

    assert again == params
    assert again.digest() == params.digest()


def test_parameters_that_do_not_match_their_hash_are_refused() -> None:
    params = choose_params(2)

    with pytest.raises(CiphertextError, match="the header: parameter hash mismatch"):
        CKKSParams.from_dict({**params.to_dict(), "scale_bits": 30}, sha256=params.digest(), source="the header")


def test_parameters_are_validated_by_field() -> None:
    with pytest.raises(ValueError, match="`poly_degree` must be a power of two, got 1000"):
        CKKSParams(1000, (60, 40, 60), 40)
    with pytest.raises(ValueError, match="`coeff_bits` must list at least two primes"):
        CKKSParams(8192, (60,), 40)


def test_the_chain_primes_are_those_of_the_seal_context() -> None:
    params = choose_params(2)
    ctx = make_context(params)
    data = ctx.first_context_data().parms().coeff_modulus()

    assert chain_primes(params) == tuple(int(m.value()) for m in data)
    assert [p.bit_length() for p in chain_primes(params)] == list(params.coeff_bits[:-1])
