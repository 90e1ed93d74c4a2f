"""The site policy: its rules against a coordinator's requests, its file, its node-config form."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.errors import ConfigError, PolicyRefusedError
from privacy.policy import RoundRequest, Rule, SitePolicy, check_secagg_setup, resolve_policy, review

POLICY = SitePolicy()  # the default: DP required, ε ≤ 8 at δ 1e-5, C ≤ 1, σ ≥ 0.5, SecAgg+ required


def _request(**kw: object) -> RoundRequest:
    values: dict[str, object] = {"dp": True, "secagg": True, "epsilon_budget": 8.0, "target_epsilon": None,
                                 "noise_multiplier": None, "max_grad_norm": 1.0, "delta": None, "rounds": 10}
    values.update(kw)
    return RoundRequest(**values)  # type: ignore[arg-type]


def test_the_default_policy_is_the_secure_one() -> None:
    assert (POLICY.dp_required, POLICY.epsilon_budget, POLICY.delta, POLICY.secagg_required) == (True, 8.0, 1e-5, True)
    review(POLICY, _request())  # a request within the policy passes


@pytest.mark.parametrize(("asks", "rule", "says"), [
    ({"dp": False}, Rule.DP_REQUIRED, "turns DP-SGD off"),
    ({"secagg": False}, Rule.SECAGG_REQUIRED, "only through SecAgg+"),
    ({"epsilon_budget": 8.5}, Rule.EPSILON_BUDGET, "at most 8"),
    ({"target_epsilon": 9.0}, Rule.EPSILON_BUDGET, "targets ε 9"),
    ({"delta": 1e-3}, Rule.DELTA, "accounts at δ 1e-05"),
    ({"max_grad_norm": 1.5}, Rule.MAX_GRAD_NORM, "at most 1"),
    ({"noise_multiplier": 0.3}, Rule.MIN_NOISE_MULTIPLIER, "at least 0.5"),
])
def test_a_request_for_less_is_refused_naming_the_rule(asks: dict[str, object], rule: Rule, says: str) -> None:
    with pytest.raises(PolicyRefusedError, match=f"refused by site policy \\[{rule}\\].*{says}") as info:
        review(POLICY, _request(**asks))
    assert info.value.rule == str(rule)


def test_a_policy_may_allow_dp_or_secagg_off_explicitly() -> None:
    review(SitePolicy(dp_required=False), _request(dp=False))
    review(SitePolicy(secagg_required=False), _request(secagg=False))


@given(budget=st.floats(0.1, 50), asked=st.floats(0.1, 100), clip=st.floats(0.1, 5), asked_clip=st.floats(0.01, 10))
def test_a_request_passes_exactly_when_it_stays_within_the_policy(budget: float, asked: float, clip: float,
                                                                  asked_clip: float) -> None:
    policy = SitePolicy(epsilon_budget=budget, max_grad_norm=clip)
    within = asked <= budget and asked_clip <= clip
    try:
        review(policy, _request(epsilon_budget=asked, max_grad_norm=asked_clip))
        refused = False
    except PolicyRefusedError:
        refused = True
    assert refused is not within


def test_a_policy_file_round_trips_and_anchors_a_relative_ledger_dir(tmp_path: Path) -> None:
    policy = SitePolicy(epsilon_budget=4.0, min_noise_multiplier=0.8, ledger_dir="ledger")
    policy.save(tmp_path / "site.toml")

    loaded = SitePolicy.load(tmp_path / "site.toml")

    assert loaded.epsilon_budget == 4.0
    assert loaded.min_noise_multiplier == 0.8
    assert loaded.ledger_dir == str((tmp_path / "ledger").resolve())
    assert loaded.ledger_file("site-2", tmp_path / "data" / "site-2") == tmp_path.resolve() / "ledger" / "site-2.json"
    assert SitePolicy().ledger_file("site-2", tmp_path / "data" / "site-2") == (
        tmp_path.resolve() / "data" / "ledgers" / "site-2.json")


@pytest.mark.parametrize(("text", "says"), [
    ("epsilon-budget = -1\n", "`epsilon-budget` must be a positive number"),
    ("epsilon-budget = 8\nsecret-backdoor = true\n", "unknown site-policy key `secret-backdoor`"),
    ("delta = 2\n", "`delta` must be in \\(0, 1\\)"),
    ("dp-required = \"maybe\"\n", "`dp-required` must be true or false"),
    ("epsilon-budget = [\n", "not valid TOML"),
    ("min-noise-multiplier = 5\nmax-noise-multiplier = 2\n", "`max-noise-multiplier` must be at least"),
])
def test_a_bad_policy_file_is_an_error_naming_the_file_and_the_key(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "site.toml").write_text(text)

    with pytest.raises(ConfigError, match=says) as info:
        SitePolicy.load(tmp_path / "site.toml")
    assert "site.toml" in str(info.value)


def test_a_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="site policy cannot be read"):
        SitePolicy.load(tmp_path / "nowhere.toml")


def test_the_policy_comes_from_the_node_config_never_the_run_config(tmp_path: Path) -> None:
    SitePolicy(epsilon_budget=2.0).save(tmp_path / "site.toml")
    given = SitePolicy(epsilon_budget=3.0)

    assert resolve_policy({"policy-file": str(tmp_path / "site.toml")}, given).epsilon_budget == 2.0
    assert resolve_policy({"epsilon-budget": "1.5", "secagg-required": "false"}, given) == SitePolicy(
        epsilon_budget=1.5, secagg_required=False)
    assert resolve_policy({"partition-id": 0, "num-partitions": 3}, given) == given
    assert resolve_policy({"partition-id": 0}) == SitePolicy()


def test_a_site_refuses_a_secagg_neighbourhood_smaller_than_its_policy_allows() -> None:
    check_secagg_setup(sample_num=200, share_num=25, threshold=15)  # the server's rule at 200 sites
    check_secagg_setup(sample_num=5, share_num=5, threshold=3)  # fewer sites than the minimum: all of them

    with pytest.raises(PolicyRefusedError, match=r"\[secagg-protocol\].*3 shares among 200 sites: this site "
                                                 r"requires at least 11 \(secagg-min-shares\)"):
        check_secagg_setup(sample_num=200, share_num=3, threshold=2)
    with pytest.raises(PolicyRefusedError, match=r"4 shares among 5 sites: this site requires at least 5"):
        check_secagg_setup(sample_num=5, share_num=4, threshold=3)
    with pytest.raises(PolicyRefusedError, match=r"25 shares among 200 sites: this site requires at least 41"):
        check_secagg_setup(sample_num=200, share_num=25, threshold=15, min_shares=41)


def test_the_minimum_neighbourhood_is_a_policy_key_of_at_least_three() -> None:
    stricter = SitePolicy.from_mapping({"secagg-min-shares": 41}, source="test")

    assert (POLICY.secagg_min_shares, stricter.secagg_min_shares) == (11, 41)
    with pytest.raises(ConfigError, match="`secagg-min-shares` must be an integer of at least 3, got 2"):
        SitePolicy(secagg_min_shares=2)
