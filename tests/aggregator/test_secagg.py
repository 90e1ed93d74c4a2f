"""The SecAgg+ share rule: logarithmic neighbourhoods the sites accept, and the run config's other readings."""

from __future__ import annotations

import math

import pytest

from aggregator.secagg import SecAggPlan, auto_share_count, plan_secagg
from federation.config import RunConfig
from federation.errors import ConfigError
from privacy.policy import check_secagg_setup

# Shares per site the rule gives (measured cost per round at 200 sites: 25 shares, against 200 all-to-all).
EXPECTED_SHARES = {2: 2, 3: 3, 5: 5, 13: 13, 14: 13, 20: 15, 50: 19, 100: 21, 200: 25, 1000: 31, 10_000: 41}


def test_small_federations_stay_all_to_all_and_larger_ones_get_logarithmic_neighbourhoods() -> None:
    got = {n: auto_share_count(n) for n in EXPECTED_SHARES}

    assert got == EXPECTED_SHARES


def test_the_share_count_is_odd_beyond_all_to_all_and_grows_as_the_logarithm() -> None:
    for n in range(14, 2001):
        k = auto_share_count(n)

        assert k % 2 == 1
        assert 13 <= k < n
        assert k <= 3 * math.log2(n) + 3


def test_every_plan_the_server_makes_is_one_the_sites_accept() -> None:
    for n in range(2, 301):
        for threshold in (0.01, 0.3, 0.5, 0.6, 1.0):
            plan = plan_secagg(n, num_shares=0.0, threshold=threshold)

            assert 2 * plan.threshold > plan.shares >= plan.threshold >= 2 or plan == SecAggPlan(2, 2, 2)
            check_secagg_setup(sample_num=n, share_num=plan.shares, threshold=plan.threshold)


def test_a_fraction_keeps_flowers_reading_and_one_is_all_to_all() -> None:
    everyone = plan_secagg(20, num_shares=1.0, threshold=0.6)
    half = plan_secagg(20, num_shares=0.5, threshold=0.6)

    assert (everyone.shares, everyone.threshold, everyone.all_to_all) == (20, 12, True)
    assert (half.shares, half.threshold, half.dropout_tolerance) == (11, 7, 4)  # 10 is even: 11


def test_an_absolute_count_is_capped_at_the_sites_and_made_odd() -> None:
    assert plan_secagg(50, num_shares=7, threshold=0.6).shares == 7
    assert plan_secagg(50, num_shares=8, threshold=0.6).shares == 9
    assert plan_secagg(5, num_shares=9, threshold=0.6).shares == 5
    assert plan_secagg(50, num_shares=9, threshold=3).threshold == 5  # raised above half of 9


@pytest.mark.parametrize(("sampled", "shares", "threshold", "says"), [
    (1, 0.0, 0.6, "at least 2 sampled sites, got 1"),
    (50, 7.5, 0.6, "`secagg-num-shares` above 1 is a count of shares and must be an integer, got 7.5"),
    (50, 9, 10, "`secagg-threshold` 10 asks for 10 shares of 9"),
    (50, 9, 4.5, "`secagg-threshold` above 1 is a count of shares and must be an integer, got 4.5"),
])
def test_unusable_share_settings_are_errors_naming_the_key(sampled: int, shares: float, threshold: float,
                                                           says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        plan_secagg(sampled, num_shares=shares, threshold=threshold)


def test_the_run_config_defaults_to_the_logarithmic_rule_and_refuses_a_negative_count() -> None:
    assert RunConfig().secagg_num_shares == 0.0

    with pytest.raises(ConfigError, match="`secagg-num-shares` must not be negative, got -1"):
        RunConfig(secagg_num_shares=-1.0)
