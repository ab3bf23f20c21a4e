"""The secure-aggregation protocol against the server it protects against, and against malformed
messages: each attack a reviewer reproduced is shown to work with the check that stops it disabled
(or by what the attacker would have learned), and to be refused now."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pfpl.errors import ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure import shamir, wire
from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import (
    MASK_INFO,
    AdvertiseKeys,
    MaskedInput,
    NeighbourKeys,
    SecAggClient,
    SecAggServer,
    SecureAggregationError,
    UnmaskRequest,
    UnmaskShares,
    _pair_info,
    run_in_memory,
)

LENGTH = 8


def _vectors(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2**64, LENGTH, dtype=np.uint64) for c in range(n)}


def _sum(vectors: dict[int, np.ndarray], who) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint64)
    for c in who:
        total = total + vectors[c]
    return total


@dataclass
class Instance:
    """An honest instance driven phase by phase, so a test can play the server."""

    vectors: dict[int, np.ndarray]
    server: SecAggServer
    clients: dict[int, SecAggClient]
    routed: dict
    masked: dict[int, MaskedInput] | None = None

    def holders_of(self, owner: int) -> list[int]:
        return self.server.holders(owner)


def _prepared(n: int, t: int, degree: int | None = None, masked: bool = True) -> Instance:
    vectors = _vectors(n)
    graph = neighbours(list(range(n)), degree, 0)
    server = SecAggServer(list(range(n)), graph, t, LENGTH)
    clients = {c: SecAggClient(c, vectors[c]) for c in range(n)}
    setups = server.setup()
    keys = server.collect_keys([clients[c].setup(setups[c]) for c in range(n)])
    routed = server.collect_shares([clients[c].share_keys(keys[c]) for c in range(n)])
    inst = Instance(vectors, server, clients, routed)
    if masked:
        inst.masked = {c: clients[c].masked_input(routed[c]) for c in range(n)}
    return inst


def _seed_from(inst: Instance, owner: int, answers: dict[int, UnmaskShares]) -> bytes:
    pos = {h: i for i, h in enumerate(inst.holders_of(owner))}
    return P.combine_secret({pos[c]: a.seed_shares[owner] for c, a in answers.items() if owner in a.seed_shares})


def _key_from(inst: Instance, owner: int, answers: dict[int, UnmaskShares]):
    pos = {h: i for i, h in enumerate(inst.holders_of(owner))}
    shares = {pos[c]: a.key_shares[owner] for c, a in answers.items() if owner in a.key_shares}
    return P.private_from_bytes(P.combine_secret(shares))


def _pairwise(inst: Instance, secret, owner: int, peer: int) -> np.ndarray:
    """The pairwise mask ``owner`` added for ``peer`` (+ if owner < peer), from owner's mask key."""
    keys = inst.server.keys
    info = _pair_info(MASK_INFO, inst.server.round_id, owner, peer, keys[owner][1], keys[peer][1])
    mask = P.prg(P.agree(secret, keys[peer][1], info), LENGTH, 64)
    return mask if owner < peer else np.uint64(0) - mask


# ---- 1. too few shares ---------------------------------------------------------------------------
def test_a_client_routed_too_few_shares_refuses_to_send_its_masked_input(monkeypatch):
    """Routed an empty SharesForYou, a client used to upload x + PRG(seed) with no pairwise mask: the
    seed's shares, which its honest holders hand over for a survivor, then give x exactly."""
    inst = _prepared(5, 3, masked=False)
    victim = wire.client_state(inst.clients[0])
    starved = replace(inst.routed[0], ciphertexts={})
    with monkeypatch.context() as m:  # the attack with the check disabled
        m.setattr(SecAggClient, "_check_enough_shares", lambda self: None)
        y0 = wire.client_from_state(victim).masked_input(starved).masked
    for c in range(1, 5):
        inst.clients[c].masked_input(inst.routed[c])
    answers = {
        c: inst.clients[c].unmask(UnmaskRequest(inst.server.round_id, c, (0, 1, 2, 3, 4), ())) for c in (1, 2, 3)
    }
    assert np.array_equal(y0 - P.prg(_seed_from(inst, 0, answers), LENGTH, 64), inst.vectors[0])  # x_0 learned

    with pytest.raises(SecureAggregationError, match="client 0: holds 1 shares.*below the threshold 3") as err:
        wire.client_from_state(victim).masked_input(starved)
    assert "\n" not in str(err.value)
    one_short = replace(inst.routed[0], ciphertexts={1: inst.routed[0].ciphertexts[1]})  # t − 2 neighbours
    with pytest.raises(SecureAggregationError, match="holds 2 shares"):
        wire.client_from_state(victim).masked_input(one_short)
    enough = replace(inst.routed[0], ciphertexts={j: inst.routed[0].ciphertexts[j] for j in (1, 2)})  # t − 1
    assert wire.client_from_state(victim).masked_input(enough).masked.shape == (LENGTH,)


# ---- 2. a consistent lie ---------------------------------------------------------------------------
def test_a_server_claiming_every_neighbour_of_a_survivor_dropped_is_refused(monkeypatch):
    """Every client is told that client 0 survived and 1–4 dropped: nobody reveals both shares of one
    client, yet 0's seed and its neighbours' keys strip every mask off y_0 (1–4 even hand over their
    own keys while alive). Each client now refuses."""
    inst = _prepared(5, 3)
    lie = {c: UnmaskRequest(inst.server.round_id, c, (0,), (1, 2, 3, 4)) for c in range(5)}
    states = {c: wire.client_state(inst.clients[c]) for c in range(5)}
    with monkeypatch.context() as m:
        m.setattr(SecAggClient, "_check_request", lambda self, msg: None)
        answers = {c: wire.client_from_state(states[c]).unmask(lie[c]) for c in range(5)}
    x0 = inst.masked[0].masked - P.prg(_seed_from(inst, 0, answers), LENGTH, 64)
    for j in range(1, 5):
        x0 = x0 + _pairwise(inst, _key_from(inst, j, answers), j, 0)  # remove 0's mask for j: −(j's own view)
    assert np.array_equal(x0, inst.vectors[0])  # the attack worked

    with pytest.raises(ProtocolError, match=r"client 0: told of 1 survivors in its neighbourhood"):
        wire.client_from_state(states[0]).unmask(lie[0])
    for c in range(1, 5):
        with pytest.raises(ProtocolError, match=rf"client {c}: told that it dropped"):
            wire.client_from_state(states[c]).unmask(lie[c])


@pytest.mark.parametrize(
    "survivors, dropped, message",
    [
        ((0, 1, 2, 3), (0,), "both shares"),
        ((1, 2, 3), (4,), "does not count it among the survivors"),
        ((0, 1, 2, 3, 9), (), r"survivors \[9\] that never shared"),
        ((0, 1, 2), (7,), r"dropped clients \[7\] whose shares it never received"),
        ((0, 1), (2, 3, 4), "below the threshold 3"),
        ((0, 1, 1, 2), (), "malformed"),
        (("0", 1, 2), (), "malformed"),
    ],
)
def test_each_unmasking_check_refuses_with_one_line_naming_the_client(survivors, dropped, message):
    inst = _prepared(5, 3)
    with pytest.raises(ProtocolError, match=message) as err:
        inst.clients[0].unmask(UnmaskRequest(inst.server.round_id, 0, survivors, dropped))
    assert "\n" not in str(err.value) and "client 0" in str(err.value)


def test_a_client_never_hears_of_a_neighbour_that_did_not_share():
    """Neighbour 4 advertised keys but its shares never reached client 0: 0 neither masks with it nor
    accepts it as a survivor or a dropped client."""
    inst = _prepared(5, 3, masked=False)
    routed = replace(inst.routed[0], ciphertexts={j: ct for j, ct in inst.routed[0].ciphertexts.items() if j != 4})
    inst.clients[0].masked_input(routed)
    assert inst.clients[0].shared_with == (1, 2, 3)
    with pytest.raises(ProtocolError, match=r"survivors \[4\]"):
        wire.client_from_state(wire.client_state(inst.clients[0])).unmask(
            UnmaskRequest(inst.server.round_id, 0, (0, 1, 2, 4), ())
        )
    with pytest.raises(ProtocolError, match=r"dropped clients \[4\]"):
        inst.clients[0].unmask(UnmaskRequest(inst.server.round_id, 0, (0, 1, 2, 3), (4,)))


# ---- 3. the same exchange twice --------------------------------------------------------------------
def test_a_second_unmasking_of_the_same_instance_is_refused(monkeypatch):
    """Asked first as a survivor (seed shares) and then, in a second request, as dropped (key shares),
    the holders of client 0 would reveal both of its secrets. Unmask answers once per instance, also
    when the client is rebuilt from its wire state between phases (as a Flower node does)."""
    inst = _prepared(3, 2)
    first = {c: UnmaskRequest(inst.server.round_id, c, (0, 1, 2), ()) for c in range(3)}
    second = {c: UnmaskRequest(inst.server.round_id, c, (1, 2), (0,)) for c in (1, 2)}
    states = {c: wire.client_state(inst.clients[c]) for c in range(3)}
    with monkeypatch.context() as m:
        m.setattr(SecAggClient, "_begin", lambda self, step: None)
        clients = {c: wire.client_from_state(states[c]) for c in range(3)}
        seeds = {c: clients[c].unmask(first[c]) for c in range(3)}
        keys = {c: clients[c].unmask(second[c]) for c in (1, 2)}
    x0 = inst.masked[0].masked - P.prg(_seed_from(inst, 0, seeds), LENGTH, 64)
    secret = _key_from(inst, 0, keys)
    for j in (1, 2):
        x0 = x0 - _pairwise(inst, secret, 0, j)
    assert np.array_equal(x0, inst.vectors[0])  # the attack worked

    for c in (1, 2):
        client = wire.client_from_state(states[c])
        client.unmask(first[c])
        assert client.finished and client.consumed
        with pytest.raises(ProtocolError, match=rf"client {c}: unmask asked at stage 'unmask'"):
            client.unmask(second[c])
        rebuilt = wire.client_from_state(wire.client_state(client))
        with pytest.raises(ProtocolError, match="each phase runs once"):
            rebuilt.unmask(second[c])


def test_every_phase_runs_once_and_in_order():
    inst = _prepared(3, 2, masked=False)
    fresh = SecAggClient(0, inst.vectors[0])
    with pytest.raises(ProtocolError, match="share_keys asked at stage 'new'"):
        fresh.share_keys(NeighbourKeys(inst.server.round_id, 0, {}))
    setup = SecAggServer([0, 1, 2], neighbours([0, 1, 2], None, 0), 2, LENGTH).setup()[0]
    fresh.setup(setup)
    with pytest.raises(ProtocolError, match="setup asked at stage 'setup'"):
        fresh.setup(setup)
    c1 = inst.clients[1]
    with pytest.raises(ProtocolError, match="unmask asked at stage 'share_keys'"):
        c1.unmask(UnmaskRequest(inst.server.round_id, 1, (0, 1, 2), ()))
    assert not c1.consumed
    c1.masked_input(inst.routed[1])
    assert c1.consumed
    with pytest.raises(ProtocolError, match="masked_input asked at stage 'masked_input'"):
        c1.masked_input(inst.routed[1])


def test_a_client_that_refused_answers_nothing_more():
    inst = _prepared(5, 3, masked=False)
    client = inst.clients[0]
    with pytest.raises(SecureAggregationError):
        client.masked_input(replace(inst.routed[0], ciphertexts={}))
    state = wire.client_state(client)
    with pytest.raises(ProtocolError, match="stage 'aborted'"):
        wire.client_from_state(state).unmask(UnmaskRequest(inst.server.round_id, 0, (0, 1, 2), ()))


# ---- 4. accusations ---------------------------------------------------------------------------------
COLLUDERS = (5, 6, 7, 8, 9)


@pytest.mark.parametrize(
    "accusations",
    [
        {c: (1, 2, 3, 4) for c in COLLUDERS},
        {5: (1,), 6: (2,), 7: (3,), 8: (4,)},
        {5: (1, 2, 3, 4)},
        {5: (1, 2), 6: (3, 4)},
    ],
    ids=["all name all", "one each", "one names all", "two each"],
)
def test_colluders_cannot_eject_honest_clients_by_accusing_them(accusations):
    """n = 10, t = 6, full graph, colluders 5–9 name honest clients 1–4 as senders of bad shares.
    Were an accusation free, 1–4 would be dropped and the sum minus the colluders' inputs would be
    x_0. Now each accusation drops the accuser too: the instance fails cleanly, or its sum holds at
    least two honest inputs."""
    n, t = 10, 6
    vectors = _vectors(n)
    graph = neighbours(list(range(n)), None, 0)
    free = run_in_memory(vectors, t, graph, drops={c: "masked" for c in (1, 2, 3, 4)})  # a free ejection
    assert np.array_equal(free.total - _sum(vectors, COLLUDERS), vectors[0])

    def accuse(phase, msgs):
        if phase != "masked":
            return msgs
        return [replace(m, rejected=accusations[m.sender]) if m.sender in accusations else m for m in msgs]

    try:
        got = run_in_memory(vectors, t, graph, meddle=accuse)
    except SecureAggregationError as err:
        assert "\n" not in str(err)
        return
    honest = set(got.survivors) - set(COLLUDERS)
    assert len(honest) >= 2
    assert np.array_equal(got.total, _sum(vectors, got.survivors))
    assert all(a in got.rejected for a in accusations)


def test_an_accusation_against_a_non_neighbour_drops_only_the_accuser():
    n, degree, t = 12, 6, 5
    graph = neighbours(list(range(n)), degree, 1)
    stranger = next(c for c in range(1, n) if c not in graph[0])
    vectors = _vectors(n)

    def accuse(phase, msgs):
        if phase != "masked":
            return msgs
        return [replace(m, rejected=(stranger,)) if m.sender == 0 else m for m in msgs]

    got = run_in_memory(vectors, t, graph, meddle=accuse)
    assert 0 in got.rejected and "not neighbours whose shares it was sent" in got.rejected[0]
    assert stranger in got.survivors and stranger not in got.rejected
    assert np.array_equal(got.total, _sum(vectors, range(1, n)))


def test_an_accuser_sends_nothing_of_its_vector():
    inst = _prepared(5, 3, masked=False)
    ct = bytearray(inst.routed[0].ciphertexts[3])
    ct[0] ^= 1
    bad = {**inst.routed[0].ciphertexts, 3: bytes(ct)}
    out = inst.clients[0].masked_input(replace(inst.routed[0], ciphertexts=bad))
    assert out.rejected == (3,) and not out.masked.any()


# ---- 5. malformed messages never crash the server --------------------------------------------------
def _alter(phase: str, sender: int, change):
    def meddle(p, msgs):
        return [change(m) if p == phase and m.sender == sender else m for m in msgs]

    return meddle


def _grafted(m: UnmaskShares, **maps) -> UnmaskShares:
    return replace(m, **{k: {**getattr(m, k), **v} for k, v in maps.items()})


MALFORMED = {
    "advertise: all-zero mask key": ("advertise", lambda m: replace(m, mask_key=bytes(32))),
    "advertise: low-order cipher key": ("advertise", lambda m: replace(m, cipher_key=(1).to_bytes(32, "little"))),
    "advertise: a dict for a key": ("advertise", lambda m: replace(m, cipher_key={"k": 1})),
    "advertise: short commitment": ("advertise", lambda m: replace(m, seed_commitment=b"c")),
    "advertise: string sender round": ("advertise", lambda m: replace(m, round_id="round")),
    "share: a dict where bytes are expected": ("share", lambda m: replace(m, ciphertexts={1: {"a": b""}})),
    "share: truncated ciphertext": (
        "share",
        lambda m: replace(m, ciphertexts={k: v[:-1] for k, v in m.ciphertexts.items()}),
    ),
    "share: string ids": ("share", lambda m: replace(m, ciphertexts={str(k): v for k, v in m.ciphertexts.items()})),
    "share: an unknown holder": ("share", lambda m: replace(m, ciphertexts={**m.ciphertexts, 99: bytes(148)})),
    "share: a list": ("share", lambda m: replace(m, ciphertexts=list(m.ciphertexts.values()))),
    "masked: rejected is a string": ("masked", lambda m: replace(m, rejected="1")),
    "masked: rejected holds a float": ("masked", lambda m: replace(m, rejected=(1.5,))),
    "masked: rejected names itself": ("masked", lambda m: replace(m, rejected=(m.sender,))),
    "masked: rejected names an unknown id": ("masked", lambda m: replace(m, rejected=(99,))),
    "masked: a list of ints": ("masked", lambda m: replace(m, masked=[int(x) for x in m.masked])),
    "masked: int64": ("masked", lambda m: replace(m, masked=m.masked.astype(np.int64))),
    "unmask: a share for an owner it was not asked about": (
        "unmask",
        lambda m: _grafted(m, seed_shares={99: bytes(66)}),
    ),
    "unmask: a key share of a survivor": ("unmask", lambda m: _grafted(m, key_shares={0: bytes(66)})),
    "unmask: a 65-byte share": (
        "unmask",
        lambda m: replace(m, seed_shares={k: v[1:] for k, v in m.seed_shares.items()}),
    ),
    "unmask: a share above the prime": (
        "unmask",
        lambda m: replace(m, seed_shares={k: b"\xff" * 66 for k in m.seed_shares}),
    ),
    "unmask: string ids": ("unmask", lambda m: replace(m, seed_shares={str(k): v for k, v in m.seed_shares.items()})),
    "unmask: a dict where bytes are expected": ("unmask", lambda m: replace(m, seed_shares={0: {"x": 1}})),
    "unmask: bytes where a dict is expected": ("unmask", lambda m: replace(m, key_shares=b"shares")),
    "unmask: the wrong message type": ("unmask", lambda m: AdvertiseKeys(m.round_id, m.sender, b"", b"", b"")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_one_malformed_message_is_a_logged_rejection_naming_its_sender(case, caplog):
    """n = 7, t = 4, full graph: client 3 sends one malformed message. The server rejects client 3 with
    a logged reason and sums the rest exactly (client 3's input too if it had already survived)."""
    phase, change = MALFORMED[case]
    vectors = _vectors(7)
    graph = neighbours(list(range(7)), None, 0)
    with caplog.at_level(logging.WARNING):
        got = run_in_memory(vectors, 4, graph, meddle=_alter(phase, 3, change))
    assert 3 in got.rejected and any("client 3" in r.getMessage() for r in caplog.records)
    assert np.array_equal(got.total, _sum(vectors, got.survivors))
    assert (3 in got.survivors) == (phase == "unmask")


def test_a_share_for_an_owner_the_sender_does_not_hold_is_rejected_on_a_sparse_graph():
    """Used to be a KeyError at the server: a seed share for a client outside the sender's neighbourhood."""
    n, degree, t = 12, 6, 5
    graph = neighbours(list(range(n)), degree, 2)
    stranger = next(c for c in range(1, n) if c not in graph[0])
    vectors = _vectors(n)
    got = run_in_memory(
        vectors, t, graph, meddle=_alter("unmask", 0, lambda m: _grafted(m, seed_shares={stranger: bytes(66)}))
    )
    assert "not asked about" in got.rejected[0]
    assert np.array_equal(got.total, _sum(vectors, range(n)))


def _corrupt_share(owners: dict[int, int], kind: str = "seed_shares"):
    """Flip one low bit of ``owner``'s share sent by each ``sender`` (still a field element)."""

    def meddle(phase, msgs):
        if phase != "unmask":
            return msgs
        out = []
        for m in msgs:
            if m.sender in owners:
                shares = dict(getattr(m, kind))
                raw = bytearray(shares[owners[m.sender]])
                raw[-1] ^= 1
                shares[owners[m.sender]] = bytes(raw)
                m = replace(m, **{kind: shares})
            out.append(m)
        return out

    return meddle


def test_a_corrupted_seed_share_is_corrected_and_its_holder_named():
    """Seven shares, threshold four: one wrong share is corrected (Berlekamp–Welch) and its holder
    rejected; plain interpolation over all seven would have produced a wrong seed."""
    vectors = _vectors(7)
    graph = neighbours(list(range(7)), None, 0)
    seen: dict[int, bytes] = {}

    def spy_then_corrupt(phase, msgs):
        msgs = _corrupt_share({3: 0})(phase, msgs)
        if phase == "unmask":
            seen.update({m.sender: m.seed_shares[0] for m in msgs})
        return msgs

    got = run_in_memory(vectors, 4, graph, meddle=spy_then_corrupt)
    assert np.array_equal(got.total, _sum(vectors, range(7)))
    assert got.rejected == {3: "a wrong share of client 0's self-mask seed"}
    honest = P.combine_secret({c: seen[c] for c in (0, 1, 2, 4)})
    try:  # what the unchecked decoding did: interpolate through every share, the wrong one included
        naive = P.combine_secret(seen)
    except ValueError:
        naive = None
    assert naive != honest


def test_more_wrong_shares_than_can_be_corrected_fail_the_instance_cleanly():
    vectors = _vectors(7)
    graph = neighbours(list(range(7)), None, 0)
    with pytest.raises(SecureAggregationError, match="client 0's self-mask seed") as err:
        run_in_memory(vectors, 4, graph, meddle=_corrupt_share({3: 0, 5: 0}))
    assert "\n" not in str(err.value)


def _shift_secret(owner: int, sender: int, answering: list[int], kind: str):
    """A holder's share chosen so that the interpolated secret comes out one larger: a well-formed
    32-byte secret that is wrong (a random corruption would not even decode to 32 bytes)."""
    x = {c: c + 1 for c in answering}  # full graph: the holders of every client are 0..n−1
    lam = 1
    for m in answering:
        if m != sender:
            lam = lam * (-x[m]) * pow(x[sender] - x[m], -1, shamir.PRIME) % shamir.PRIME
    delta = pow(lam, -1, shamir.PRIME)

    def meddle(phase, msgs):
        if phase != "unmask":
            return msgs
        out = []
        for m in msgs:
            if m.sender == sender:
                shares = dict(getattr(m, kind))
                value = (int.from_bytes(shares[owner], "big") + delta) % shamir.PRIME
                shares[owner] = value.to_bytes(shamir.SHARE_BYTES, "big")
                m = replace(m, **{kind: shares})
            out.append(m)
        return out

    return meddle


@pytest.mark.parametrize(
    "kind, owner, message", [("key_shares", 6, "advertised public key"), ("seed_shares", 0, "commitment")]
)
def test_a_wrong_share_without_redundancy_is_caught_by_the_owners_key_or_commitment(kind, owner, message):
    """Exactly t shares answer (no redundancy to correct): a colluding holder shifts its share so that
    the secret decodes to another 32-byte value; the rebuilt key's public key or the seed's commitment
    exposes it, and the instance fails cleanly instead of returning a wrong sum."""
    vectors = _vectors(7)
    graph = neighbours(list(range(7)), None, 0)
    drops = {6: "masked", 4: "unmask", 5: "unmask"}  # 6 dropped; 0–3 answer: 4 shares of everything
    ok = run_in_memory(vectors, 4, graph, drops=drops)
    assert np.array_equal(ok.total, _sum(vectors, range(6)))
    with pytest.raises(SecureAggregationError, match=message):
        run_in_memory(vectors, 4, graph, drops=drops, meddle=_shift_secret(owner, 2, [0, 1, 2, 3], kind))


def test_a_low_order_key_no_longer_knocks_out_the_neighbours():
    """An all-zero X25519 key makes every exchange with it fail (cryptography raises): the server now
    rejects it at collect_keys, and a client handed one anyway leaves that peer out instead of crashing."""
    sk, _ = P.new_key_pair()
    with pytest.raises(ValueError):  # what used to escape from every neighbour's share_keys
        P.agree(sk, bytes(32), b"info")
    vectors = _vectors(5)
    graph = neighbours(list(range(5)), None, 0)
    got = run_in_memory(vectors, 3, graph, meddle=_alter("advertise", 2, lambda m: replace(m, mask_key=bytes(32))))
    assert "X25519" in got.rejected[2] and got.survivors == (0, 1, 3, 4)
    assert np.array_equal(got.total, _sum(vectors, [0, 1, 3, 4]))

    client = SecAggClient(0, vectors[0])
    setup = SecAggServer(list(range(5)), graph, 3, LENGTH).setup()[0]
    client.setup(setup)
    peers = {j: P.new_key_pair()[1] for j in range(1, 5)}
    keys = {j: (peers[j], P.new_key_pair()[1]) for j in range(1, 5)}
    keys[2] = (bytes(32), keys[2][1])
    out = client.share_keys(NeighbourKeys(setup.round_id, 0, keys))
    assert sorted(out.ciphertexts) == [1, 3, 4] and 2 not in client.peer_keys


def test_a_key_altered_on_its_way_is_detected_by_the_neighbours():
    """The shares' AEAD binds both parties' public keys: a mask key replaced by another valid key (the
    pairwise masks would silently fail to cancel) makes every neighbour's decryption fail instead."""
    vectors = _vectors(5)
    graph = neighbours(list(range(5)), None, 0)
    other = P.new_key_pair()[1]
    try:
        got = run_in_memory(vectors, 3, graph, meddle=_alter("advertise", 2, lambda m: replace(m, mask_key=other)))
    except SecureAggregationError:
        return
    assert 2 not in got.survivors
    assert np.array_equal(got.total, _sum(vectors, got.survivors))


def test_the_server_refuses_a_threshold_its_clients_would_refuse():
    from pfpl.errors import ConfigError

    with pytest.raises(ConfigError, match="strict majority"):
        SecAggServer([0, 1, 2, 3], neighbours([0, 1, 2, 3], None, 0), 2, LENGTH)
    setup = SecAggServer([0, 1, 2], neighbours([0, 1, 2], None, 0), 2, LENGTH).setup()[0]
    with pytest.raises(ProtocolError, match="not a strict majority"):
        SecAggClient(0, _vectors(1)[0]).setup(replace(setup, threshold=1))


def test_shamir_decoding_corrects_up_to_half_the_redundancy():
    rng = np.random.default_rng(0)
    for t, n in [(1, 3), (3, 5), (4, 9), (6, 13)]:
        secret = int(rng.integers(0, 2**62))
        shares = dict(enumerate(shamir.split(secret, t, n), start=1))
        for errors in range((n - t) // 2 + 1):
            bad = dict(shares)
            liars = sorted(rng.choice(list(shares), errors, replace=False).tolist())
            for x in liars:
                bad[x] = (bad[x] + 1 + int(rng.integers(0, 1000))) % shamir.PRIME
            assert shamir.decode(bad, t) == (secret, liars)
        too_many = dict(shares)
        for x in list(shares)[: (n - t) // 2 + 1]:
            too_many[x] = (too_many[x] + 7) % shamir.PRIME
        try:
            got, _ = shamir.decode(too_many, t)
        except shamir.DecodingError:
            continue
        assert got != secret  # beyond the radius: refused, or another codeword (never silently right)


@pytest.mark.parametrize("flip", [False, True], ids=["copy", "copy-with-bit-255"])
def test_colluders_copying_an_honest_mask_key_cannot_cancel_a_targets_masks(flip):
    """Two colluders (t − 1 of 5, full graph) each advertise, as their mask key, a copy of an honest
    neighbour's (or the same point with bit 255 set). Pairwise keys used to be HKDF(X25519, round)
    only: the target's masks with a colluder and with the copied client were equal with opposite signs
    and cancelled, leaving x + PRG(seed) — and the server learns the seed in the unmasking. Now the
    server refuses non-canonical and repeated keys (every holder of a copied key leaves), and each
    pairwise key binds both ids and both public keys, so even two equal X25519 secrets give unrelated
    masks."""
    from pfpl.secure import protocol as Pr

    n, t, length = 5, 3, 6
    rng = np.random.default_rng(1)
    vectors = {c: rng.integers(0, 2**63, length, dtype=np.uint64) for c in range(n)}
    clients = {c: Pr.SecAggClient(c, v) for c, v in vectors.items()}
    server = Pr.SecAggServer(list(range(n)), neighbours(list(range(n)), None, 0), t, length)
    setups = server.setup()
    adverts = {c: clients[c].setup(setups[c]) for c in range(n)}
    for colluder, honest in {0: 3, 4: 1}.items():
        key = bytearray(adverts[honest].mask_key)
        if flip:
            key[31] |= 0x80  # the same X25519 point under other bytes
        adverts[colluder] = replace(adverts[colluder], mask_key=bytes(key))
    server.collect_keys(list(adverts.values()))
    assert {0, 4} <= set(server.rejected) and not {0, 4} & server.u1
    if not flip:
        assert {1, 3} <= set(server.rejected)  # the copied clients leave too: copying costs the copier
    # the derivation itself: the same X25519 secret with two different peers gives two different keys
    ka, kb = P.new_key_pair()[1], P.new_key_pair()[1]
    assert Pr._pair_info(Pr.MASK_INFO, b"r", 2, 0, ka, kb) != Pr._pair_info(Pr.MASK_INFO, b"r", 2, 3, ka, kb)
    assert Pr._pair_info(Pr.MASK_INFO, b"r", 2, 0, ka, kb) == Pr._pair_info(Pr.MASK_INFO, b"r", 0, 2, kb, ka)
