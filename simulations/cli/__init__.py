"""The ``privrad`` command line: a leaf on top of every package. It formats typed results and holds no logic.

:mod:`simulations.cli.main` holds the root verbs (phantoms, train, simulate, budget, deploy,
policy, …) and mounts the ``he`` verbs (:mod:`simulations.cli.he`) and the storage verbs
(``vault``, ``keyed``, ``leakage``: :mod:`simulations.cli.storage`).
"""

from simulations.cli.main import app, main

__all__ = ["app", "main"]
