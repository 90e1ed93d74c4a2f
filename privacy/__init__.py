"""The runtime of privacy at a hospital: what the site enforces, whatever the coordinator asks.

:mod:`~privacy.policy` (the site policy and its review of a round), :mod:`~privacy.ledger`
(the locked, append-only ε ledger), :mod:`~privacy.dp` (one DP-SGD round with Opacus, on the
site's own CSPRNG), :mod:`~privacy.vault` (authenticated encryption of images at rest),
:mod:`~privacy.keyed` (the keyed block transform and the attack that breaks it) and the
attack maths of the audits: :mod:`~privacy.membership`, :mod:`~privacy.inversion`,
:mod:`~privacy.leakage`. The runners of the audits live in :mod:`simulations`.
"""

from privacy.dp import DPRandomness, plan_round, private_round
from privacy.ledger import PrivacyLedger
from privacy.policy import SitePolicy, review

__all__ = ["DPRandomness", "PrivacyLedger", "SitePolicy", "plan_round", "private_round", "review"]
