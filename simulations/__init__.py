"""The top layer: synthetic hospitals, scenario runners, sweeps, audits, reports and the ``privrad`` CLI.

:mod:`~simulations.phantoms` and :mod:`~simulations.builtin` (kidney-CT-like DICOM
hospitals), :mod:`~simulations.apps` (the Flower apps ``flwr run .`` starts),
:mod:`~simulations.federated` (Flower's Simulation Engine), :mod:`~simulations.local` and
:mod:`~simulations.centralised` (the baselines), :mod:`~simulations.selection` (choices on
the validation split), :mod:`~simulations.budget` and :mod:`~simulations.report` (the
privacy-budget sweep), :mod:`~simulations.audits` (gradient inversion, storage leakage),
:mod:`~simulations.keyed_tier`, :mod:`~simulations.deployment` (a real SuperLink and
SuperNodes on loopback) and :mod:`simulations.cli`.
"""

from simulations.phantoms import PhantomConfig, generate_phantoms

__all__ = ["PhantomConfig", "generate_phantoms"]
