"""Record keys both sides of the federation read and write: one closed set each.

:class:`FitMetric` is the site's allow-list of fit-reply metrics (the ClientApp checks every
reply against it on the way out; the ServerApp reduces exactly these).
"""

from __future__ import annotations

import enum

__all__ = ["FitMetric"]


class FitMetric(enum.StrEnum):
    """The allow-list: the only metrics a fit reply may carry (none of them is a statistic of records)."""

    SITE = "site"
    ROUND = "round"
    REFUSED = "refused"
    EPSILON = "epsilon"
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise_multiplier"
    STEPS = "steps"
