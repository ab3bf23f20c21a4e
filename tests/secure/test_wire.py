"""The secure-aggregation protocol with every message and every client state passed as flat fields (a
Flower node runs each phase in a fresh process): the sum is exact; malformed fields are refused."""

from __future__ import annotations

import numpy as np
import pytest

from pfpl.errors import ProtocolError
from pfpl.secure import wire
from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import AdvertiseKeys, SecAggClient, SecAggServer, Setup


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
    fields = wire.to_fields(AdvertiseKeys(b"r" * 16, 3, b"k" * 32, b"m" * 32))
    change(fields)
    with pytest.raises(ProtocolError, match=message):
        wire.from_fields(fields)


def test_a_message_of_another_type_is_refused():
    fields = wire.to_fields(AdvertiseKeys(b"r" * 16, 3, b"k" * 32, b"m" * 32))
    with pytest.raises(ProtocolError, match="where a Setup was expected"):
        wire.from_fields(fields, Setup)
