"""The Flower app components named in pyproject.toml resolve and work on real data."""

from __future__ import annotations

import time
import tomllib
from importlib import import_module
from pathlib import Path

import numpy as np
from flwr.clientapp import ClientApp
from flwr.common import Context, Message, RecordDict
from flwr.server import ServerApp

from aggregator.metrics import refusal_rule
from clients.client_app import DatasetCache, HospitalClient, Site, policy_gate, site_data_path
from federation.config import RunConfig
from federation.errors import PolicyRefusedError
from federation.ingest import Preprocess, load_dataset
from federation.model import build_model, get_weights, set_weights
from privacy.policy import SitePolicy

ROOT = Path(__file__).resolve().parents[1]


def _component(ref: str) -> object:
    module, attr = ref.split(":")
    return getattr(import_module(module), attr)


def test_pyproject_components_are_a_server_app_and_a_client_app() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]

    assert isinstance(_component(cfg["serverapp"]), ServerApp)
    assert isinstance(_component(cfg["clientapp"]), ClientApp)


def test_partition_id_selects_the_site_folder(tmp_path: Path) -> None:
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config={"data-dir": str(tmp_path)})

    assert site_data_path(ctx) == tmp_path / "site-2"


def test_a_hospital_client_trains_from_the_sent_weights(tiny_federation: Path) -> None:
    cfg = RunConfig(image_size=32, dp=False, local_epochs=1)
    arch = cfg.arch()
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    policy = SitePolicy(dp_required=False)  # this site allows non-private training
    client = HospitalClient(Site("site-1", data, policy, None), cfg, run="1", secagg=True)
    start = get_weights(build_model(arch, seed=0))

    weights, n, metrics = client.fit(start, {"server-round": 1})

    assert n == len(data)  # without DP the policy accepted that its size is visible
    assert metrics == {"site": "site-1", "round": 1, "refused": 0}  # no loss: nothing about the records
    assert len(weights) == len(start)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start, strict=True))
    model = build_model(arch)
    set_weights(model, weights)
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(model), weights, strict=True))


def test_a_site_whose_policy_requires_dp_refuses_a_plain_round(tiny_federation: Path) -> None:
    import pytest


    cfg = RunConfig(image_size=32, dp=False, local_epochs=1)
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    client = HospitalClient(Site("site-1", data, SitePolicy(), None), cfg, run="1", secagg=True)

    with pytest.raises(PolicyRefusedError, match=r"\[dp-required\]"):
        client.fit(get_weights(build_model(cfg.arch(), seed=0)), {"server-round": 1})


def test_a_site_answers_no_evaluation_or_query_message(tiny_federation: Path) -> None:
    from flwr.common import Message, MessageType, Metadata


    gate = policy_gate(SitePolicy(), {"data-dir": str(tiny_federation)})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"data-dir": str(tiny_federation)})
    for kind in (MessageType.EVALUATE, MessageType.QUERY):
        meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=kind)

        def never(msg: Message, ctxt: Context) -> Message:
            raise AssertionError("the site must not run its client for this message")

        reply = gate(Message(RecordDict(), metadata=meta), ctx, never)

        assert reply.has_error()
        assert refusal_rule(reply) == "train-only"


def _secagg_message(stage: str, **fields: object) -> Message:
    from flwr.app import ConfigRecord
    from flwr.common import Message, MessageType, Metadata
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    record = ConfigRecord({"stage": stage, **fields})  # type: ignore[arg-type]
    return Message(RecordDict({RECORD_KEY_CONFIGS: record}), metadata=meta)


def _gate_answer(tiny_federation: Path, msg: Message) -> Message:
    gate = policy_gate(SitePolicy(), {"data-dir": str(tiny_federation), "image-size": 32})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"data-dir": str(tiny_federation), "image-size": 32})

    def secagg(msg: Message, ctxt: Context) -> Message:
        raise AssertionError("the site must not take part in this SecAgg+ stage")

    return gate(msg, ctx, secagg)


def test_a_site_refuses_a_secagg_threshold_of_half_the_shares_or_less(tiny_federation: Path) -> None:
    # 5 sites, 5 shares, threshold 2: the coordinator could gather 2 seed shares and 2 key shares of one site
    reply = _gate_answer(tiny_federation, _secagg_message("setup", sample_num=5, share_num=5, threshold=2,
                                                          clipping_range=8.0, target_range=1 << 22,
                                                          mod_range=1 << 32, max_weight=1000.0))

    assert refusal_rule(reply) == "secagg-protocol"
    assert "must exceed half the shares" in (reply.error.reason or "")


def test_a_site_refuses_to_unmask_a_node_listed_as_alive_and_dropped(tiny_federation: Path) -> None:
    reply = _gate_answer(tiny_federation, _secagg_message("unmask", active_nids=[11, 12, 13], dead_nids=[12]))
    malformed = _gate_answer(tiny_federation, _secagg_message("unmask", active_nids=[11], dead_nids="12"))

    assert refusal_rule(reply) == "secagg-protocol"
    assert "[12] as alive and as dropped" in (reply.error.reason or "")
    assert refusal_rule(malformed) == "secagg-protocol"


def test_a_site_refuses_a_secagg_neighbourhood_too_small_for_its_policy(tiny_federation: Path) -> None:
    # 200 sites, 5 shares: the coordinator and the site's 4 neighbours could unmask it (the policy wants 11)
    reply = _gate_answer(tiny_federation, _secagg_message("setup", sample_num=200, share_num=5, threshold=3,
                                                          clipping_range=8.0, target_range=1 << 22,
                                                          mod_range=1 << 32, max_weight=1000.0))

    assert refusal_rule(reply) == "secagg-protocol"
    assert "5 shares among 200 sites: this site requires at least 11 (secagg-min-shares)" in (reply.error.reason
                                                                                              or "")


def test_a_process_decodes_a_site_once_and_drops_the_least_recent_beyond_its_byte_limit(tiny_federation: Path) -> None:
    one_set = 12 * 1 * 32 * 32 * 4  # 12 slices, float32, one channel
    roomy, tight = DatasetCache(limit=10 * one_set), DatasetCache(limit=one_set)

    first = roomy.get(tiny_federation / "site-1", 32)
    again = roomy.get(tiny_federation / "site-1", 32)
    other_size = roomy.get(tiny_federation / "site-1", 16)
    kept = tight.get(tiny_federation / "site-1", 32)
    tight.get(tiny_federation / "site-2", 32)  # over the limit: site-1 goes
    reloaded = tight.get(tiny_federation / "site-1", 32)

    assert again is first
    assert other_size is not first
    assert tuple(other_size.images.shape[-2:]) == (16, 16)
    assert reloaded is not kept
    assert bool((reloaded.images == kept.images).all())
