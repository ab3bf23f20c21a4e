"""Secure aggregation's round trips on Flower (pfpl.federation.flower.secure_carrier): each exchange's
instances are set up while the exchange before runs, so a secure exchange costs its train message
(which carries the masked inputs) and one unmasking round trip; the key rounds of an instance ride on
earlier messages. And what a server can do with an instance set up ahead of its exchange."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from flower_grid import InProcessGrid, job, same, small_cfg

from pfpl.federation.flower import records as R
from pfpl.federation.flower.apps import run_job
from pfpl.federation.runner import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("sync", ["fedavg", "step"])
def test_a_secure_exchange_costs_one_round_trip_more_than_a_plain_one(flower_cache, tmp_path, sync):
    """Per node: two key rounds of their own for the run's first exchange, then one unmasking round
    trip per exchange — and the run ends where the simulator's does."""
    cfg = small_cfg(
        flower_cache,
        "train.methods=['promptfl']",
        "federation.secure_aggregation=true",
        f"federation.sync='{sync}'",
        "federation.rounds=3",
    )
    grid = InProcessGrid(3, flower_cache, record=True)
    flower = run_job(grid, job(cfg, tmp_path / "flower"))
    same(flower, run(cfg, tmp_path / "sim"))
    trains = Counter(node for kind, node in grid.sent if kind == "train")
    secure = Counter(node for kind, node in grid.sent if kind == "train.secagg")
    exchanges = trains[next(iter(trains))]
    assert exchanges == cfg.federation.rounds * (1 if sync == "fedavg" else cfg.federation.local_steps)
    assert set(trains) == set(secure) and all(n == exchanges for n in trains.values())
    assert all(n == 2 + exchanges for n in secure.values()), (secure, exchanges)
    assert flower["methods"]["promptfl"]["flower"]["secure_round_trips"] == 2 + exchanges
    # every train reply but the run's last carries masked inputs and the next exchange's key advertisements
    for kind, _, snap in grid.replies:
        if kind == "train":
            phases = {R.secagg_entry(k)[0] for k in snap["config"] if k.startswith("secagg/")}
            assert "masked" in phases and phases <= {"masked", "advertise"}


def test_an_instance_set_up_ahead_masks_only_the_upload_of_its_own_exchange(flower_cache, caplog):
    """The uploads of round 0, step 0 wait on the nodes. The server sets up instances named for
    another exchange — the next step, the same step of another round — and asks them for masked
    inputs: every node refuses (no upload of that exchange waits), so an instance set up ahead can
    never carry an upload other than its own exchange's. The instance of (0, 0) itself still works."""
    from test_flower_privacy import _deviating_setup  # (0, 0)'s uploads wait on the nodes

    cfg, _, _, training = _deviating_setup(flower_cache)
    carrier, everyone = training.carrier, list(range(cfg.federation.n_clients))
    for exchange in [(0, 1), (1, 0)]:
        plans, servers = training._secure_plans(everyone, *exchange)
        carrier.prepare(exchange, plans, servers)
        carrier.ready(exchange)
        (key,) = plans
        instance = carrier.ahead[exchange][key]
        assert instance.phase == "masked" and set(instance.inbox) == set(everyone)
        caplog.clear()
        with caplog.at_level("WARNING"):
            answers = carrier.round_trip(exchange, "masked", {key: instance.inbox}, plans)
        assert answers[key] == []
        refused = [m for m in caplog.messages if "no upload of this exchange is waiting" in m]
        assert len(refused) == len(everyone), caplog.messages
    plans, servers = training._secure_plans(everyone, 0, 0)
    carrier.prepare((0, 0), plans, servers)
    carrier.ready((0, 0))
    (key,) = plans
    answers = carrier.round_trip((0, 0), "masked", {key: carrier.ahead[(0, 0)][key].inbox}, plans)
    assert sorted(m.sender for m in answers[key]) == everyone


# ---- a malicious server against the node's protocol states (found by an adversarial review) ----------
def _masked_instance(cache):
    """The (0, 0) uploads masked into an instance of everyone (full graph): ready to unmask."""
    from test_flower_privacy import _deviating_setup, _instance

    cfg, bench, grid, training = _deviating_setup(cache)
    carrier, key = training.carrier, "0.0"
    everyone = list(range(cfg.federation.n_clients))
    _, _, _, plan, server, _ = _instance(training, everyone)
    inbox = server.setup()
    for phase, collect in (("advertise", "collect_keys"), ("share", "collect_shares"), ("masked", "collect_masked")):
        inbox = getattr(server, collect)(carrier.round_trip((0, 0), phase, {key: inbox}, {key: plan})[key])
    return grid, training, everyone, plan, server, inbox


def _both_secrets(replies_or_messages, v: int) -> tuple[set, set]:
    seeds, keys = set(), set()
    for m in replies_or_messages:
        seeds |= {m.sender} if v in m.seed_shares else set()
        keys |= {m.sender} if v in m.key_shares else set()
    return seeds, keys


def test_one_message_naming_a_client_twice_gets_one_unmasking_answer(flower_cache, caplog):
    """``…/2`` and ``…/02`` name one client: a server sending an honest unmasking request (v survived)
    and, under the second name, a lying one (v dropped) to every holder gets only the first answered
    — never both of v's secrets."""
    from flwr.app import ConfigRecord

    from pfpl.secure import wire
    from pfpl.secure.protocol import UnmaskRequest, UnmaskShares

    grid, training, everyone, plan, server, inbox = _masked_instance(flower_cache)
    v, cluster = 2, training.cluster
    others = [c for c in everyone if c != v]
    payloads = {}
    for c in everyone:
        content = payloads.setdefault(cluster.node_of[c], R.content(training._header(round=0, step=0)))
        content.config_records[f"secagg/unmask/0.0.0.0/{c}"] = ConfigRecord(wire.to_fields(inbox[c]))
        if c != v:
            lie = UnmaskRequest(server.round_id, c, tuple(others), (v,))
            content.config_records[f"secagg/unmask/0.0.0.0/0{c}"] = ConfigRecord(wire.to_fields(lie))
    with caplog.at_level("WARNING"):
        replies = cluster.send("train.secagg", payloads)
    answers = [
        wire.from_fields(dict(record), UnmaskShares)
        for reply in replies.values()
        for entry, record in reply.config_records.items()
        if entry.startswith("secagg/")
    ]
    seeds, keys = _both_secrets(answers, v)
    assert seeds == set(everyone) and not keys
    assert sum("not written canonically" in m for m in caplog.messages) == len(others)


def test_a_node_handed_a_stale_state_does_not_answer_an_unmasking_twice(flower_cache, caplog):
    """Flower's state race: the node gets its context from before its unmasking answer. The answer
    it gave is in its release ledger on disk, so a second, contradictory request (v dropped) is
    refused: the server never holds v's seed and its mask key."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from pfpl.secure.protocol import UnmaskRequest

    grid, training, everyone, plan, server, inbox = _masked_instance(flower_cache)
    v, carrier = 2, training.carrier
    stale = {
        n: recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(c.state).SerializeToString()))
        for n, c in grid.contexts.items()
    }
    seeds, _ = _both_secrets(carrier.round_trip((0, 0), "unmask", {"0.0": inbox}, {"0.0": plan})["0.0"], v)
    assert seeds == set(everyone)
    for n, context in grid.contexts.items():
        context.state = stale[n]
    others = [c for c in everyone if c != v]
    lie = {c: UnmaskRequest(server.round_id, c, tuple(others), (v,)) for c in others}
    with caplog.at_level("WARNING"):
        got = carrier.round_trip((0, 0), "unmask", {"0.0": lie}, {"0.0": plan})["0.0"]
    assert got == []
    assert sum("answered unmask of this instance already" in m for m in caplog.messages) == len(others)


def test_a_replay_that_splits_a_rounds_steps_cannot_mask_a_covered_step_again(flower_cache, caplog):
    """Round 1's one exchange covers local steps 0–1 and is summed over everyone. The server replays
    it as step 0 alone, then asks for step 1 — whose upload is the one already masked — in an
    instance without client u: every node refuses to mask it (the ledger holds every step an upload
    covered), so no second sum differing by u exists."""
    from test_flower_privacy import _instance, _past_an_honest_round, _run_instances

    cfg, bench, grid, training = _past_an_honest_round(
        flower_cache, "federation.secure_aggregation=true", "secure.graph='full'"
    )
    cluster, everyone, u = training.cluster, list(range(cfg.federation.n_clients)), 3

    def train(step: int, steps: int) -> None:
        payloads = {
            node: R.content(
                training._header(round=1, step=step, steps=steps, last=False, clients=members),
                training.server.broadcast(torch.tensor(members)),
            )
            for node, members in cluster.by_node(everyone).items()
        }
        assert set(cluster.send("train", payloads)) == set(grid.contexts)

    train(0, 2)
    (total,) = _run_instances(
        training, {"0.0": _instance(training, everyone)}, training._header(round=1, step=0)
    ).values()
    assert not isinstance(total, Exception)
    train(0, 1)
    train(1, 1)
    without_u = [c for c in everyone if c != u]
    caplog.clear()
    with caplog.at_level("WARNING"):
        (again,) = _run_instances(
            training, {"0.0": _instance(training, without_u)}, training._header(round=1, step=1)
        ).values()
    assert isinstance(again, Exception)
    assert sum("not masked a second time" in m for m in caplog.messages) == len(without_u)
