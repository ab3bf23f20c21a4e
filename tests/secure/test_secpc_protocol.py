"""SecPC as a message protocol (:mod:`pfpl.secure.secpc_protocol`): the clients' state machines and
the server driver give exactly the plaintext clustering (absent workers up to the recovery threshold,
a clean error below it); the server only ever relays ciphertexts, and tampering with one makes its
owner absent, never a wrong clustering; malformed requests and replies are refused cleanly; masks
come from OS entropy, not from the public settings seed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pfpl.errors import ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure.field import PRIMES
from pfpl.secure.secpc import (
    ClusteringError,
    SecPCSettings,
    cluster,
    plain_distances,
    project,
    project_row,
    quantize,
)
from pfpl.secure.secpc_protocol import (
    InMemorySecPC,
    SecPCClient,
    SecPCServer,
    _nonce,
    channel_info,
    query_budget,
    recovery_threshold,
    rows_associated,
    run_secpc,
    run_secpc_in_memory,
    settings_vector,
)

S = SecPCSettings(projection_dim=16, restarts=2, max_iterations=20)  # K = 2, T = 1: 5 results decode


def _planted(n: int = 12, groups: int = 3, dim: int = 24, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, groups)))[0].T * np.sqrt(dim)
    return centres[np.arange(n) % groups] + spread * rng.standard_normal((n, dim))


def _plain(feats: np.ndarray, settings: SecPCSettings = S):
    return cluster(feats, settings, secure=False)[0]


class Recorder:
    """A transport that plays the curious server: it sees (and may alter) every request and reply."""

    def __init__(self, feats, settings=S, absent_workers=None, before=None, after=None):
        self.transport = InMemorySecPC(feats, settings, absent_workers)
        self.before, self.after = before, after
        self.log: list[tuple[str, dict, dict]] = []

    def deliver(self, phase, requests):
        if self.before:
            requests = self.before(phase, requests)
        replies = self.transport.deliver(phase, requests)
        if self.after:
            replies = self.after(phase, replies)
        self.log.append((phase, requests, replies))
        return replies


def _checked_run(feats, settings=S, **kw):
    """run_secpc through a Recorder, checking every decoded (D', E') against plain_distances."""
    rec = Recorder(feats, settings, **kw)
    server = SecPCServer(len(feats), settings)
    inner = server.distances
    x = quantize(project(feats, settings.projection_dim, settings.seed), settings.frac_bits)

    def distances(deliver, assignment):
        d, e = inner(deliver, assignment)
        d_plain, e_plain = plain_distances(x[list(server.owners)], assignment)
        assert (d == d_plain).all() and (e == e_plain).all()
        return d, e

    server.distances = distances
    result, stats = server.run(rec.deliver)
    return result, stats, rec


# ---- correctness -------------------------------------------------------------------------------
def test_projecting_one_row_equals_that_row_of_the_matrix_bit_for_bit():
    rng = np.random.default_rng(1)
    for n, f in ((7, 24), (5, 2048), (1, 3)):
        feats = rng.standard_normal((n, f)) * 10.0 ** rng.integers(-3, 3, (n, 1))
        matrix = project(feats, 64, seed=9)
        for i in range(n):
            assert project_row(feats[i], 64, 9).view(np.uint64).tolist() == matrix[i].view(np.uint64).tolist()
            assert project_row(np.ascontiguousarray(feats[i][::-1][::-1]), 64, 9).tobytes() == matrix[i].tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_protocol_gives_exactly_the_plaintext_clustering(seed):
    feats = _planted(seed=seed)
    settings = SecPCSettings(**{**S.__dict__, "seed": seed})
    result, stats, _ = _checked_run(feats, settings)
    plain = _plain(feats, settings)
    assert np.array_equal(result.assignment, plain.assignment) and result.history == plain.history
    assert result.objective == plain.objective and result.clients.tolist() == list(range(len(feats)))
    assert stats.owners == stats.workers == tuple(range(12)) and not stats.rejected
    assert stats.rounds == result.iterations and stats.bytes_per_client > 0 and stats.server_seconds > 0


@pytest.mark.parametrize("absent", [1, 4, 7])  # 12 workers, 5 results decode: up to 7 may be absent
def test_absent_workers_up_to_the_recovery_threshold_change_nothing(absent):
    feats = _planted(seed=absent)
    gone = set(np.random.default_rng(absent).choice(12, absent, replace=False).tolist())
    result, stats, rec = _checked_run(feats, absent_workers=gone)
    assert np.array_equal(result.assignment, _plain(feats).assignment)
    assert stats.owners == tuple(range(12))  # the absent workers' rows still count
    assert set(stats.answering) == set(range(12)) - gone and set(stats.rejected) == gone
    later = [requests for phase, requests, _ in rec.log if phase == "evaluate"][1:]
    assert all(not set(r) & gone for r in later)  # asked once, then left out


def test_one_absent_worker_too_many_is_one_clustering_error():
    feats = _planted()
    for absent in (set(range(8)), set(range(12))):
        with pytest.raises(ClusteringError, match="recovery threshold") as err:
            run_secpc_in_memory(feats, S, absent_workers=absent)
        assert "\n" not in str(err.value)
    with pytest.raises(ClusteringError, match="recovery threshold"):  # too few clients at all
        run_secpc_in_memory(feats[:4], S)


def test_cluster_runs_the_protocol_and_keeps_its_statistics():
    feats = _planted(n=20, groups=4, seed=5)
    result, stats = cluster(feats, S, secure=True, absent_workers={3})
    assert np.array_equal(result.assignment, _plain(feats).assignment) and result.clients is None
    assert stats.rounds == result.iterations and stats.bytes_per_client > 0
    assert stats.client_seconds > 0 and stats.server_seconds > 0


def test_clients_known_to_be_absent_are_never_asked_to_evaluate():
    feats = _planted()
    rec = Recorder(feats)
    result, stats = run_secpc(12, S, rec.deliver, absent={2, 9})
    assert np.array_equal(result.assignment, _plain(feats).assignment)
    assert all(not {2, 9} & set(r) for phase, r, _ in rec.log if phase == "evaluate")


# ---- what the server sees ------------------------------------------------------------------------
def _leaves(message):
    if isinstance(message, dict):
        for v in message.values():
            yield from _leaves(v)
    elif isinstance(message, (list, tuple)):
        for v in message:
            yield from _leaves(v)
    else:
        yield message


def test_the_server_relays_only_ciphertexts_it_cannot_read():
    feats = _planted()
    result, stats, rec = _checked_run(feats)
    clients = rec.transport.clients
    x = quantize(project(feats, S.projection_dim, S.seed), S.frac_bits)
    secrets = []  # every client's row and coded rows, in every encoding a message could carry
    for c, client in clients.items():
        secrets += [x[c].astype("<i8").tobytes(), x[c].astype("<i4").tobytes()]
        secrets += [row.astype(dt).tobytes() for row in client._held.values() for dt in ("<u4", "<i8")]
        secrets += [client._sk and P.private_bytes(client._sk)]
    blob = b"".join(
        leaf.tobytes() if isinstance(leaf, np.ndarray) else leaf if isinstance(leaf, bytes) else b""
        for _, requests, replies in rec.log
        for leaf in _leaves([requests, replies])
    )
    assert not any(s in blob for s in secrets)
    # every leaf is a type a Flower RecordDict carries
    for _, requests, replies in rec.log:
        for leaf in _leaves([requests, replies]):
            assert isinstance(leaf, (bytes, int, np.ndarray)) and not isinstance(leaf, bool)
            assert not isinstance(leaf, np.ndarray) or leaf.dtype == np.int64
    # each client receives ciphertexts only, of other clients' rows, exactly as their senders made them
    share = {phase: (q, r) for phase, q, r in rec.log if phase in ("share", "hold")}
    sent = {
        (s, int(j)): ct
        for s, reply in share["share"][1].items()
        for j, ct in zip(reply["recipients"], reply["ciphertexts"])
    }
    for c, request in share["hold"][0].items():
        assert c not in request["senders"].tolist()
        assert all(sent[(int(s), c)] == ct for s, ct in zip(request["senders"], request["ciphertexts"]))
    # a key of the server's own cannot open them
    server_sk, _ = P.new_key_pair()
    (s, j), ct = next(iter(sent.items()))
    peer = clients[j].public_key
    key = P.agree(server_sk, peer, channel_info(clients[s].clustering, s, clients[s].public_key, j, peer))
    ad = rows_associated(
        clients[s].clustering, s, j, settings_vector(S), clients[s].workers, (clients[s].public_key, peer)
    )
    with pytest.raises(P.AuthenticationError):
        P.decrypt(key, ct, ad, _nonce(0, 1))


def _flip(ct: bytes, at: int = 5) -> bytes:
    return ct[:at] + bytes([ct[at] ^ 1]) + ct[at + 1 :]


def _alter_hold(holder: int, sender: int, how):
    def before(phase, requests):
        if phase == "hold":
            r = requests[holder]
            pos = r["senders"].tolist().index(sender)
            cts = list(r["ciphertexts"])
            cts[pos] = how(cts, pos)
            requests = {**requests, holder: {**r, "ciphertexts": cts}}
        return requests

    return before


@pytest.mark.parametrize(
    "how",
    [
        lambda cts, pos: _flip(cts[pos]),  # a flipped bit
        lambda cts, pos: cts[pos - 1] if pos else cts[pos + 1],  # another sender's row, misrouted
        lambda cts, pos: cts[pos][:-1],  # truncated
        lambda cts, pos: os.urandom(len(cts[pos])),  # forged
    ],
    ids=["flipped", "misrouted", "truncated", "forged"],
)
def test_a_tampered_row_makes_its_owner_absent_never_a_wrong_clustering(how, monkeypatch):
    feats = _planted(seed=4)
    result, stats, _ = _checked_run(feats, before=_alter_hold(holder=3, sender=5, how=how))
    owners = [c for c in range(12) if c not in (3, 5)]  # the owner and the holder that reported it
    assert stats.owners == tuple(owners) and result.clients.tolist() == owners
    assert 3 in stats.workers and 3 in stats.answering  # the reporter still computes on the others' rows
    assert np.array_equal(result.assignment, _plain(feats[owners]).assignment)
    original, before = InMemorySecPC.deliver, _alter_hold(3, 5, how)
    monkeypatch.setattr(InMemorySecPC, "deliver", lambda self, phase, r: original(self, phase, before(phase, r)))
    with pytest.raises(ClusteringError, match="did not reach every worker"):  # the simulator's path wants all
        cluster(feats, S, secure=True)


def _alter_reply(phase_name: str, client: int, how):
    def after(phase, replies):
        if phase == phase_name and client in replies:
            replies = {**replies, client: how(replies[client])}
        return replies

    return after


def _results(fn):
    return lambda reply: {**reply, "results": fn(reply["results"].copy())}


def _bump(r):
    r[0, 0] = (r[0, 0] + 1) % PRIMES[0]
    return r


def test_one_wrong_result_is_found_and_left_out():
    feats = _planted(seed=6)
    result, stats, _ = _checked_run(feats, after=_alter_reply("evaluate", 2, _results(_bump)))
    assert "inconsistent" in stats.rejected[2] and 2 not in stats.answering and 2 in stats.owners
    assert np.array_equal(result.assignment, _plain(feats).assignment)


def test_wrong_results_beyond_correction_fail_cleanly():
    feats = _planted(seed=6)
    after = lambda phase, replies: _alter_reply("evaluate", 3, _results(_bump))(
        phase, _alter_reply("evaluate", 1, _results(_bump))(phase, replies)
    )
    with pytest.raises(ClusteringError, match="inconsistent"):
        run_secpc(12, S, Recorder(feats, after=after).deliver)


def test_an_owner_whose_coded_rows_are_no_codeword_fails_cleanly():
    """Client 4 sends garbage rows (properly encrypted): every worker's result is then off the
    polynomial, which the spare results reveal — a clean error, not a wrong clustering."""
    feats = _planted(seed=2)
    rec = Recorder(feats)
    liar = rec.transport.clients[4]
    honest = liar._share

    def garbage(request):
        reply = honest(request)
        for pos, j in enumerate(reply["recipients"].tolist()):
            key, peer = liar._channels[j], liar.peer_keys[j]
            plain = np.random.default_rng(j).integers(0, 2**20, 3 * 8, dtype=np.int64).astype("<u4").tobytes()
            ad = rows_associated(liar.clustering, 4, j, settings_vector(S), liar.workers, (liar.public_key, peer))
            reply["ciphertexts"][pos] = P.encrypt(key, plain, ad, _nonce(4, j))
        return reply

    liar._share = garbage
    with pytest.raises(ClusteringError, match="inconsistent"):
        run_secpc(12, S, rec.deliver)


# ---- malformed replies -----------------------------------------------------------------------------
BAD_REPLIES = {
    "keys": [
        lambda r: {},
        lambda r: {**r, "extra": 1},
        lambda r: {"public_key": b"\x00" * 32},  # a low-order point
        lambda r: {"public_key": (2**255 - 1).to_bytes(32, "little")},  # not canonical
        lambda r: {"public_key": r["public_key"][:31]},
        lambda r: {"public_key": "text"},
        lambda r: [r],
    ],
    "share": [
        lambda r: {**r, "recipients": r["recipients"][:-1]},
        lambda r: {**r, "recipients": r["recipients"].astype(np.float64)},
        lambda r: {**r, "ciphertexts": r["ciphertexts"][:-1]},
        lambda r: {**r, "ciphertexts": [c + b"x" for c in r["ciphertexts"]]},
        lambda r: {**r, "ciphertexts": ["x"] * len(r["ciphertexts"])},
        lambda r: None,
    ],
    "hold": [
        lambda r: {"held": r["held"][::-1]},
        lambda r: {"held": np.array([99], dtype=np.int64)},
        lambda r: {"held": r["held"].astype(np.int32)},
        lambda r: {"held": r["held"].tolist()},
        lambda r: {"held": np.array([c for c in r["held"] if c != 6], dtype=np.int64)},  # without itself
    ],
    "evaluate": [
        lambda r: {**r, "query": r["query"] - 1},  # a stale result
        lambda r: {**r, "query": True},
        lambda r: {**r, "results": r["results"][:, :-1]},
        lambda r: {**r, "results": r["results"].astype(np.float64)},
        lambda r: {**r, "results": r["results"] + np.array(PRIMES)[:, None]},  # outside the field
        lambda r: {**r, "results": -r["results"] - 1},
        lambda r: {"query": r["query"]},
    ],
}


@pytest.mark.parametrize("phase, index", [(p, i) for p, cases in BAD_REPLIES.items() for i in range(len(cases))])
def test_a_malformed_reply_makes_its_client_absent_never_a_crash(phase, index):
    feats = _planted(seed=3)
    result, stats, _ = _checked_run(feats, after=_alter_reply(phase, 6, BAD_REPLIES[phase][index]))
    assert 6 in stats.rejected and "\n" not in stats.rejected[6]
    owners = list(stats.owners)
    assert (6 in owners) == (phase in ("hold", "evaluate"))  # its row is lost only if it never left it
    assert np.array_equal(result.assignment, _plain(feats[owners]).assignment)


def test_copied_public_keys_remove_every_holder_of_the_copy():
    feats = _planted()
    copy = {}

    def after(phase, replies):
        if phase == "keys":
            copy["key"] = replies[1]["public_key"]
            replies = {**replies, 8: {"public_key": copy["key"]}}
        return replies

    result, stats, _ = _checked_run(feats, after=after)
    assert {1, 8} <= set(stats.rejected) and 1 not in stats.workers and 8 not in stats.owners
    assert np.array_equal(result.assignment, _plain(feats[list(stats.owners)]).assignment)


def test_replies_from_clients_never_asked_are_ignored():
    feats = _planted()
    after = lambda phase, replies: {**replies, 99: {"x": 1}, "y": 2}
    result, stats, _ = _checked_run(feats, after=after)
    assert np.array_equal(result.assignment, _plain(feats).assignment) and not stats.rejected


# ---- malformed requests ------------------------------------------------------------------------------
def _group(n: int = 5, settings: SecPCSettings = S):
    """n honest clients taken through ``keys`` by hand; the test is the server."""
    rows = _planted(n=n)
    clients = {c: SecPCClient(c, rows[c], settings, n) for c in range(n)}
    ids = np.arange(n, dtype=np.int64)
    cid = os.urandom(16)
    keys = [
        clients[c].handle("keys", {"clustering": cid, "clients": ids.copy(), "settings": settings_vector(settings)})[
            "public_key"
        ]
        for c in range(n)
    ]
    return clients, ids, keys


def _keys_request(n=5, **change):
    return {
        "clustering": os.urandom(16),
        "clients": np.arange(n, dtype=np.int64),
        "settings": settings_vector(S),
        **change,
    }


@pytest.mark.parametrize(
    "request_, match",
    [
        ({"clustering": b"short"}, "clustering id"),
        ({"clients": np.array([0, 2, 1, 3, 4], dtype=np.int64)}, "participant list"),
        ({"clients": np.array([1, 2, 3, 4, 5], dtype=np.int64)}, "participant list"),
        ({"clients": [0, 1, 2, 3, 4]}, "participant list"),
        ({"clients": np.arange(9, dtype=np.int64)}, "9 participants"),
        ({"settings": settings_vector(SecPCSettings(**{**S.__dict__, "privacy": 0}))}, "settings"),
        ({"settings": settings_vector(S)[:-1]}, "settings"),
        ({"extra": 1}, "fields"),
    ],
)
def test_a_malformed_keys_request_is_refused(request_, match):
    client = SecPCClient(0, np.ones(24), S, 5)
    with pytest.raises(ProtocolError, match=match) as err:
        client.handle("keys", _keys_request(**request_))
    assert "\n" not in str(err.value) and client.stage == "aborted"
    with pytest.raises(ProtocolError, match="stage 'aborted'"):  # and it answers nothing more
        client.handle("keys", _keys_request())


def test_phases_run_in_order_once_each_and_evaluate_repeatedly():
    client = SecPCClient(0, np.ones(24), S, 5)
    for phase in ("share", "hold", "evaluate", "summary"):
        with pytest.raises(ProtocolError, match="stage 'new'|unknown phase"):
            SecPCClient(0, np.ones(24), S, 5).handle(phase, {})
    client.handle("keys", _keys_request())
    with pytest.raises(ProtocolError, match="keys asked at stage 'keys'"):
        client.handle("keys", _keys_request())
    with pytest.raises(ClusteringError, match="recovery threshold"):  # fewer workers than decode: no row leaves
        SecPCClient(0, np.ones(24), S, 5).handle("keys", _keys_request(n=4, clients=np.arange(4, dtype=np.int64)))


def _shared(n=5):
    """A group through ``share``; returns clients, ids, keys and the share replies."""
    clients, ids, keys = _group(n)
    replies = {c: clients[c].handle("share", {"clients": ids.copy(), "public_keys": list(keys)}) for c in range(n)}
    return clients, ids, keys, replies


def test_a_malformed_share_request_is_refused():
    low_order = b"\x00" * 32
    non_canonical = (2**255 - 1).to_bytes(32, "little")
    cases = [
        (lambda ids, keys: {"clients": ids[:-1], "public_keys": keys[:-1]}, "recovery threshold"),
        (lambda ids, keys: {"clients": ids, "public_keys": keys[:-1]}, "one byte string per worker"),
        (lambda ids, keys: {"clients": ids, "public_keys": [keys[1], *keys[1:]]}, "own public key"),
        (lambda ids, keys: {"clients": ids, "public_keys": [keys[0], low_order, *keys[2:]]}, "key agreement"),
        (lambda ids, keys: {"clients": ids, "public_keys": [keys[0], non_canonical, *keys[2:]]}, "not canonical"),
        (lambda ids, keys: {"clients": ids, "public_keys": [keys[0], keys[0], *keys[2:]]}, "copy"),
        (lambda ids, keys: {"clients": ids, "public_keys": [keys[0], keys[2], *keys[2:]]}, "copy"),
        (lambda ids, keys: {"clients": ids + 10, "public_keys": keys}, "workers"),
    ]
    for make, match in cases:
        clients, ids, keys = _group()
        with pytest.raises((ProtocolError, ClusteringError), match=match):
            clients[0].handle("share", make(ids.copy(), list(keys)))
        assert clients[0].stage == "aborted"


def test_a_malformed_hold_request_is_refused_and_bad_rows_are_not_held():
    clients, ids, keys, replies = _shared()
    client = clients[0]
    for request, match in [
        ({"senders": np.array([2, 1], dtype=np.int64), "ciphertexts": [b"", b""]}, "senders"),
        ({"senders": np.array([0], dtype=np.int64), "ciphertexts": [b""]}, "senders"),
        ({"senders": np.array([1], dtype=np.int64), "ciphertexts": []}, "one byte string per sender"),
    ]:
        trial = SecPCClient.__new__(SecPCClient)
        trial.__dict__ = {**client.__dict__}
        with pytest.raises(ProtocolError, match=match):
            trial.handle("hold", request)
    cts = {s: replies[s]["ciphertexts"][replies[s]["recipients"].tolist().index(0)] for s in range(1, 5)}
    cts[2] = _flip(cts[2])
    cts[3] = cts[4]  # 4's row presented as 3's
    reply = client.handle("hold", {"senders": np.arange(1, 5, dtype=np.int64), "ciphertexts": list(cts.values())})
    assert reply["held"].tolist() == [0, 1, 4]


def _holding(n=5):
    clients, ids, keys, replies = _shared(n)
    for c in range(n):
        senders = [s for s in range(n) if s != c]
        cts = [replies[s]["ciphertexts"][replies[s]["recipients"].tolist().index(c)] for s in senders]
        assert clients[c].handle("hold", {"senders": np.array(senders, dtype=np.int64), "ciphertexts": cts})[
            "held"
        ].tolist() == list(range(n))
    return clients


@pytest.mark.parametrize(
    "request_, match",
    [
        ({"assignment": np.array([0, 1, 2, 3, 5], dtype=np.int64)}, "clusters are not 0..M"),
        ({"assignment": np.array([0, 1, 1, 0, -1], dtype=np.int64)}, "clusters are not 0..M"),
        ({"assignment": np.array([0, 1, 1, 0, 10**12], dtype=np.int64)}, "clusters are not 0..M"),
        ({"assignment": np.array([0, 1, 1, 0], dtype=np.int64)}, "shape"),
        ({"assignment": np.array([0, 1, 1, 0, 1], dtype=np.float64)}, "int64"),
        ({"assignment": [0, 1, 1, 0, 1]}, "int64"),
        ({"query": 0}, "query"),
        ({"query": "1"}, "query"),
        ({"owners": np.array([0, 1, 7], dtype=np.int64), "assignment": np.zeros(3, dtype=np.int64)}, "owners"),
        ({"owners": np.array([1, 0], dtype=np.int64), "assignment": np.zeros(2, dtype=np.int64)}, "owners"),
    ],
)
def test_a_malformed_evaluate_request_is_refused(request_, match):
    client = _holding()[0]
    base = {"query": 1, "owners": np.arange(5, dtype=np.int64), "assignment": np.array([0, 1, 1, 0, 1], dtype=np.int64)}
    if "query" in request_:
        client.handle("evaluate", base)  # a valid first query
    with pytest.raises(ProtocolError, match=match) as err:
        client.handle("evaluate", {**base, **request_})
    assert "\n" not in str(err.value) and client.stage == "aborted"


def test_the_owner_set_is_fixed_and_the_queries_are_budgeted():
    clients = _holding()
    owners = np.arange(5, dtype=np.int64)
    request = {"query": 1, "owners": owners, "assignment": np.zeros(5, dtype=np.int64)}
    assert clients[0].handle("evaluate", request)["results"].shape == (3, 5 + 1)
    with pytest.raises(ProtocolError, match="owner set changed"):  # differencing two owner sets
        clients[0].handle("evaluate", {"query": 2, "owners": owners[1:], "assignment": np.zeros(4, dtype=np.int64)})
    client = clients[1]
    for q in range(1, query_budget(S) + 1):
        client.handle("evaluate", {**request, "query": q})
    with pytest.raises(ProtocolError, match="most one clustering needs"):
        client.handle("evaluate", {**request, "query": query_budget(S) + 1})


def test_a_client_with_other_settings_stays_out_and_the_rest_cluster():
    feats = _planted()
    rec = Recorder(feats)
    other = SecPCSettings(**{**S.__dict__, "privacy": 2})
    rec.transport.clients[7] = SecPCClient(7, feats[7], other, 12)
    result, stats = run_secpc(12, S, rec.deliver)
    assert "settings" in rec.transport.aborted[7] and 7 not in stats.owners
    assert np.array_equal(result.assignment, _plain(feats[list(stats.owners)]).assignment)


# ---- randomness --------------------------------------------------------------------------------------
def test_masks_come_from_os_entropy_not_from_the_settings_seed():
    """The same row, id, settings and peer twice: the coded rows a peer decrypts differ (fresh masks),
    and so does the coded row the client keeps."""
    row = _planted()[0]
    peer_sk, peer_pk = P.new_key_pair()
    ids = np.arange(recovery_threshold(S), dtype=np.int64)
    others = [P.new_key_pair()[1] for _ in ids[2:]]
    seen, kept = [], []
    for _ in range(2):
        client = SecPCClient(0, row, S, len(ids))
        cid = b"\x07" * 16  # even the clustering id the same
        pk = client.handle("keys", {"clustering": cid, "clients": ids, "settings": settings_vector(S)})["public_key"]
        reply = client.handle("share", {"clients": ids, "public_keys": [pk, peer_pk, *others]})
        key = P.agree(peer_sk, pk, channel_info(cid, 0, pk, 1, peer_pk))
        ad = rows_associated(cid, 0, 1, settings_vector(S), ids, (pk, peer_pk))
        seen.append(P.decrypt(key, reply["ciphertexts"][0], ad, _nonce(0, 1)))
        kept.append(client._held[0].copy())
    assert seen[0] != seen[1] and not np.array_equal(kept[0], kept[1])
