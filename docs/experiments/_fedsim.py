"""FedAvg of privrad's DP-SGD without Flower or SecAgg+, for the tuning studies here (not a library).

Each site gets a :class:`privacy.dp.RoundPlan` whose σ spends ``eps`` (δ = 1e-5) over all the rounds, as a DP
client plans it; a round trains a copy of the global model on every site and averages the copies (equal weights, as
privrad's DP clients send, or by site size). SecAgg+ changes nothing in the sum.
"""
import copy
from collections.abc import Sequence

from torch import nn

from federation.ingest import ImageSet
from federation.train import TrainConfig
from privacy.dp import DPRandomness, RoundPlan, noise_for_target, sample_rate, steps_per_epoch, train_dp_round


def site_plans(sites: Sequence[ImageSet], *, bs: int, local: int, rounds: int, eps: float, C: float) -> list[RoundPlan]:
    plans = []
    for s in sites:
        q, spe = sample_rate(len(s), bs), steps_per_epoch(len(s), bs)
        sigma = noise_for_target(eps, delta=1e-5, sample_rate=q, steps=spe * local * rounds)
        plans.append(RoundPlan(sigma, C, q, local * spe, 1e-5))
    return plans


def fedavg_round(g: nn.Module, sites: Sequence[ImageSet], plans: Sequence[RoundPlan], tc: TrainConfig,
                 *, by_size: bool = False) -> None:
    """One round: DP-SGD on a copy of ``g`` at every site, then ``g`` = the (weighted) mean of the copies."""
    states = []
    for s, pl in zip(sites, plans):
        m = copy.deepcopy(g)
        train_dp_round(m, s, train=tc, plan=pl, randomness=DPRandomness.fresh())
        states.append(m.state_dict())
    w = [len(s) for s in sites] if by_size else [1] * len(sites)
    g.load_state_dict({k: sum(st[k] * wi for st, wi in zip(states, w)) / sum(w) for k in states[0]})
