"""The secure-aggregation protocol with every message and every client state passed as flat fields (a
Flower node runs each phase in a fresh process): the sum is exact; malformed fields are refused."""

from __future__ import annotations

import numpy as np
import pytest

from pfpl.errors import ProtocolError
from pfpl.secure import wire
from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import AdvertiseKeys, SecAggClient, SecAggServer, Setup, SharesForYou, UnmaskShares


def test_a_protocol_carried_as_fields_with_clients_rebuilt_every_phase_sums_exactly():
    n, t, length = 6, 3, 9
    rng = np.random.default_rng(0)
    vectors = {c: rng.integers(0, 2**64, length, dtype=np.uint64) for c in range(n)}
    graph = neighbours(list(range(n)), 4, 0)
    server = SecAggServer(list(range(n)), graph, t, length, 64)
    states = {c: wire.client_state(SecAggClient(c, v)) for c, v in vectors.items()}
    dropped = {4}  # drops before its masked input

    def phase(inbox: dict, step, alive) -> list:
        out = []
        for c, msg in inbox.items():
            if c not in alive:
                continue
            client = wire.client_from_state(states[c])  # a fresh process
            reply = step(client, wire.from_fields(wire.to_fields(msg)))
            states[c] = wire.client_state(client)
            out.append(wire.from_fields(wire.to_fields(reply)))
        return out

    everyone = set(range(n))
    keys = server.collect_keys(phase(server.setup(), SecAggClient.setup, everyone))
    routed = server.collect_shares(phase(keys, SecAggClient.share_keys, everyone))
    requests = server.collect_masked(phase(routed, SecAggClient.masked_input, everyone - dropped))
    total = server.collect_unmask(phase(requests, SecAggClient.unmask, everyone - dropped))
    expected = np.zeros(length, dtype=np.uint64)
    for c in everyone - dropped:
        expected = expected + vectors[c]
    assert np.array_equal(total, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("round_id"), "missing"),
        (lambda f: f.update(sender="7"), "integer"),
        (lambda f: f.update(cipher_key=[1, 2]), "bytes"),
        (lambda f: f.update(type="Pickle"), "not a secure-aggregation message"),
    ],
)
def test_malformed_fields_are_refused(change, message):
    fields = wire.to_fields(AdvertiseKeys(b"r" * 16, 3, b"k" * 32, b"m" * 32, b"c" * 32))
    change(fields)
    with pytest.raises(ProtocolError, match=message):
        wire.from_fields(fields)


def test_a_message_of_another_type_is_refused():
    fields = wire.to_fields(AdvertiseKeys(b"r" * 16, 3, b"k" * 32, b"m" * 32, b"c" * 32))
    with pytest.raises(ProtocolError, match="where a Setup was expected"):
        wire.from_fields(fields, Setup)


def test_duplicate_ids_in_a_map_are_refused():
    """A dict would silently keep the last of two entries for one id (e.g. two shares for one holder)."""
    fields = wire.to_fields(UnmaskShares(b"r" * 16, 3, {1: b"a" * 66}, {}))
    fields["seed_shares.ids"] = [1, 1]
    fields["seed_shares.values"] = [b"a" * 66, b"b" * 66]
    with pytest.raises(ProtocolError, match="names one id twice"):
        wire.from_fields(fields)
    with pytest.raises(ProtocolError, match="must be fields"):
        wire.from_fields([("type", "Setup")])


def test_the_client_state_carries_its_stage_and_accusations():
    """A node rebuilds its client from these fields every phase: the stage (each phase once, in order)
    and whom it accused must survive the trip, and a state of an unknown stage is refused."""
    graph = neighbours([0, 1, 2], None, 0)
    server = SecAggServer([0, 1, 2], graph, 2, 4)
    clients = {c: SecAggClient(c, np.zeros(4, dtype=np.uint64)) for c in range(3)}
    setups = server.setup()
    keys = server.collect_keys([clients[c].setup(setups[c]) for c in range(3)])
    shares = [clients[c].share_keys(keys[c]) for c in range(3)]
    routed = server.collect_shares(shares)
    bad = dict(routed[0].ciphertexts)
    bad[2] = bad[2][:-1] + bytes([bad[2][-1] ^ 1])
    client = wire.client_from_state(wire.client_state(clients[0]))
    client.masked_input(SharesForYou(routed[0].round_id, 0, bad))
    again = wire.client_from_state(wire.client_state(client))
    assert (again.stage, again.accused, again.shared_with) == (client.stage, (2,), (1, 2))
    with pytest.raises(ProtocolError, match="masked_input asked at stage 'masked_input'"):
        again.masked_input(routed[0])
    state = wire.client_state(client)
    state["stage"] = 9
    with pytest.raises(ProtocolError, match="stage 9"):
        wire.client_from_state(state)
    state["stage"] = 0
    with pytest.raises(ProtocolError, match="with a setup"):
        wire.client_from_state(state)
