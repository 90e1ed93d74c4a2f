"""Synthetic hospitals and scenario runners."""

from simulations.phantoms import PhantomConfig, generate_phantoms

__all__ = ["PhantomConfig", "generate_phantoms"]
