"""The compiler's passes, in the order :func:`he_inference.compiler.compile_model` runs them.

Each pass is a pure function that returns new frozen objects and leaves its input untouched:

1. :mod:`~.trace`: PyTorch model → :class:`~.ir.Network` (value types in :mod:`~.ir`).
2. :mod:`~.fold`: BatchNorm into convolutions, a patchify stem into the client's transform,
   pools into the classifier.
3. :mod:`~.layout`: the slot packing (:class:`~.layout.Packing`, :class:`~.layout.Layout`).
4. :mod:`~.lower`: the instruction list, a frozen :class:`~.program.Plan` (:mod:`~.program`).
5. :mod:`~.levels`: the one level and scale assignment every engine uses.
6. :mod:`~.cost`: per-layer counts and the cost model (rotations, transfers).
7. :mod:`~.interpret`: plaintext evaluation of a network and of a plan (the references).
"""

from he_inference.passes.fold import fold
from he_inference.passes.interpret import SlotSimulator, run_plain, value_ranges
from he_inference.passes.ir import Network
from he_inference.passes.layout import Packing, choose_packing
from he_inference.passes.levels import LevelAssignment, assign_levels
from he_inference.passes.lower import lower
from he_inference.passes.program import Plan
from he_inference.passes.trace import trace

__all__ = [
    "LevelAssignment",
    "Network",
    "Packing",
    "Plan",
    "SlotSimulator",
    "assign_levels",
    "choose_packing",
    "fold",
    "lower",
    "run_plain",
    "trace",
    "value_ranges",
]
