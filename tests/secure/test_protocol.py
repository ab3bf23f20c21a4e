"""SecAgg / SecAgg+ as client and server state machines: exact sums under dropouts, clean failure
below the threshold, uniform-looking masked vectors, cancelling masks, rejected bad messages."""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from pfpl.errors import ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure.encoding import FixedPoint
from pfpl.secure.graph import default_degree, neighbours
from pfpl.secure.protocol import (
    PHASES,
    MaskedInput,
    SecAggClient,
    SecAggServer,
    SecureAggregationError,
    run_in_memory,
)


def _vectors(n: int, length: int = 12, bits: int = 64, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = 2**bits if bits < 64 else 2**64
    return {c: rng.integers(0, top, length, dtype=np.uint64) for c in range(n)}


def _sum(vectors: dict[int, np.ndarray], who, bits: int = 64) -> np.ndarray:
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for c in who:
        total = total + vectors[c]
    return total & np.uint64((1 << bits) - 1) if bits < 64 else total


def test_the_sum_is_exact_for_every_set_of_dropouts_at_or_above_the_threshold():
    """n = 5, full graph, t = 3: every subset of clients drops (each at a phase that varies with the
    subset); the survivors' sum comes out exactly whenever ≥ t clients answer the unmasking, and the
    run fails with one clear error otherwise."""
    n, t = 5, 3
    vectors = _vectors(n)
    graph = neighbours(list(range(n)), None, 0)
    outcomes = {"exact": 0, "failed": 0}
    for size in range(n + 1):
        for k, dropped in enumerate(itertools.combinations(range(n), size)):
            drops = {c: PHASES[(c + k) % 4] for c in dropped}
            delivered = [c for c in range(n) if c not in drops or drops[c] == "unmask"]
            answering = [c for c in range(n) if c not in drops]
            if len(answering) >= t and delivered:
                got = run_in_memory(vectors, t, graph, drops=drops)
                assert got.survivors == tuple(delivered)
                assert np.array_equal(got.total, _sum(vectors, delivered)), drops
                outcomes["exact"] += 1
            else:
                with pytest.raises(SecureAggregationError) as err:
                    run_in_memory(vectors, t, graph, drops=drops)
                assert "\n" not in str(err.value)
                outcomes["failed"] += 1
    assert outcomes["exact"] > 10 and outcomes["failed"] > 5


@pytest.mark.parametrize("n, bits", [(12, 64), (30, 32)])
def test_secagg_plus_sparse_graph_with_dropouts(n, bits):
    degree = default_degree(n)
    graph = neighbours(list(range(n)), degree, 3)
    assert all(len(v) == degree for v in graph.values()) and degree < n - 1
    assert all(c in graph[j] for c, js in graph.items() for j in js)  # symmetric
    t = int(np.ceil(0.6 * (degree + 1)))
    vectors = _vectors(n, 40, bits, seed=n)
    drops = {1: "share", 4: "masked", 7: "unmask", 9: "advertise"}
    got = run_in_memory(vectors, t, graph, ring_bits=bits, drops=drops)
    delivered = [c for c in range(n) if c not in drops or drops[c] == "unmask"]
    assert np.array_equal(got.total, _sum(vectors, delivered, bits))
    full = run_in_memory(vectors, n // 2 + 1, neighbours(list(range(n)), None, 3), ring_bits=bits, drops=drops)
    assert np.array_equal(full.total, got.total)
    per_neighbour = 4 * 66 + 64  # two shares out, two back, AEAD tag and ids: O(k) per client, not O(n)
    assert max(got.bytes_sent.values()) <= 40 * 8 + 2 * 32 + degree * per_neighbour
    assert np.mean(list(got.bytes_sent.values())) < np.mean(list(full.bytes_sent.values()))


def test_a_masked_vector_looks_uniform_to_the_server():
    """The server sees y = x + masks for one client: chi-square against uniform over Z_2^8 accepts it,
    while the same statistic rejects the unmasked vector (the test can fail)."""
    bits, length = 8, 20000
    x = np.full(length, 7, dtype=np.uint64)  # a maximally non-uniform input
    seen = {}

    def spy(phase, msgs):
        if phase == "masked":
            seen.update({m.sender: m.masked for m in msgs})
        return msgs

    vectors = {0: x, 1: x.copy(), 2: x.copy()}
    run_in_memory(vectors, 2, neighbours([0, 1, 2], None, 0), ring_bits=bits, meddle=spy)
    counts = np.bincount(seen[0].astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.chisquare(np.bincount(x.astype(np.int64), minlength=256)).pvalue < 1e-12


def test_two_clients_pairwise_masks_cancel():
    a_sk, a_pk = P.new_key_pair()
    b_sk, b_pk = P.new_key_pair()
    info = b"pfpl-secagg/mask" + b"round"
    mask_ab = P.prg(P.agree(a_sk, b_pk, info), 1000, 64)
    mask_ba = P.prg(P.agree(b_sk, a_pk, info), 1000, 64)
    assert np.array_equal(mask_ab, mask_ba) and mask_ab.any()
    assert not (mask_ab - mask_ba).any()  # +PRG(s_ab) from the smaller id, −PRG(s_ba) from the larger
    other = P.prg(P.agree(a_sk, b_pk, b"pfpl-secagg/mask" + b"other"), 1000, 64)
    assert not np.array_equal(mask_ab, other)  # bound to the round


def test_a_replayed_message_is_rejected_and_its_sender_treated_as_dropped(caplog):
    vectors = _vectors(4)
    graph = neighbours(list(range(4)), None, 0)
    old = SecAggClient(2, vectors[2]).setup(SecAggServer([0, 1, 2, 3], graph, 3, 12).setup()[2])

    def replay(phase, msgs):
        return [old if m.sender == 2 else m for m in msgs] if phase == "advertise" else msgs

    with caplog.at_level(logging.WARNING):
        got = run_in_memory(vectors, 3, graph, meddle=replay)
    assert 2 not in got.survivors and "another protocol round" in got.rejected[2]
    assert np.array_equal(got.total, _sum(vectors, [0, 1, 3]))
    assert any("client 2" in r.getMessage() for r in caplog.records)


def test_a_tampered_share_is_rejected_and_its_sender_treated_as_dropped():
    """Client 3's share to client 0 is altered: 0 accuses 3, and an accusation drops the accuser too
    (it never ejects a client for free), so the sum is that of 1, 2 and 4."""
    vectors = _vectors(5)
    graph = neighbours(list(range(5)), None, 0)

    def tamper(phase, msgs):
        if phase != "share":
            return msgs
        out = []
        for m in msgs:
            if m.sender == 3:
                bad = dict(m.ciphertexts)
                ct = bytearray(bad[0])
                ct[5] ^= 0x01
                bad[0] = bytes(ct)
                m = replace(m, ciphertexts=bad)
            out.append(m)
        return out

    got = run_in_memory(vectors, 3, graph, meddle=tamper)
    assert 3 not in got.survivors and "failed authentication at client 0" in got.rejected[3]
    assert 0 not in got.survivors and "accused clients [3]" in got.rejected[0]
    assert got.survivors == (1, 2, 4)
    assert np.array_equal(got.total, _sum(vectors, [1, 2, 4]))


@pytest.mark.parametrize("bad", ["short", "float", "out of ring"])
def test_a_malformed_masked_input_is_rejected(bad):
    bits = 16
    vectors = _vectors(4, bits=bits)
    graph = neighbours(list(range(4)), None, 0)

    def corrupt(phase, msgs):
        if phase != "masked":
            return msgs
        out = []
        for m in msgs:
            if m.sender == 1:
                y = {
                    "short": m.masked[:-1],
                    "float": m.masked.astype(np.float64),
                    "out of ring": m.masked | np.uint64(1 << 20),
                }[bad]
                m = MaskedInput(m.round_id, m.sender, y, m.rejected)
            out.append(m)
        return out

    got = run_in_memory(vectors, 3, graph, ring_bits=bits, meddle=corrupt)
    assert 1 not in got.survivors and 1 in got.rejected
    assert np.array_equal(got.total, _sum(vectors, [0, 2, 3], bits))


def test_a_client_never_reveals_both_shares_of_one_client():
    vectors = _vectors(3)
    graph = neighbours([0, 1, 2], None, 0)
    server = SecAggServer([0, 1, 2], graph, 2, 12)
    clients = {c: SecAggClient(c, vectors[c]) for c in range(3)}
    setups = server.setup()
    keys = server.collect_keys([clients[c].setup(setups[c]) for c in range(3)])
    routed = server.collect_shares([clients[c].share_keys(keys[c]) for c in range(3)])
    requests = server.collect_masked([clients[c].masked_input(routed[c]) for c in range(3)])
    greedy = replace(requests[0], survivors=(0, 1, 2), dropped=(1,))
    with pytest.raises(ProtocolError, match="both shares"):
        clients[0].unmask(greedy)


def test_fixed_point_round_trips_and_refuses_what_would_wrap():
    fp = FixedPoint(32, 2.0**10)
    x = np.array([1.5, -2.25, 0.0009765625, -1000.0])
    summed = fp.to_ring(fp.quantize(x)) + fp.to_ring(fp.quantize(-x / 2))
    assert np.allclose(fp.decode(summed & fp.modulus_mask), x / 2, atol=1 / 2**10)
    with pytest.raises(ProtocolError, match="cannot be aggregated securely"):
        fp.quantize(np.array([2.0**20]), summands=4)
    with pytest.raises(ProtocolError, match="NaN"):
        fp.quantize(np.array([np.nan]))


def test_shamir_recovers_from_any_threshold_of_shares_and_not_from_fewer():
    secret = b"k" * 32
    shares = P.split_secret(secret, 3, 5)
    for chosen in itertools.combinations(range(5), 3):
        assert P.combine_secret({i: shares[i] for i in chosen}) == secret
    with contextlib.suppress(ValueError):  # the interpolation may leave the 32-byte range: not a secret
        assert P.combine_secret({0: shares[0], 1: shares[1]}) != secret


def test_fewer_than_threshold_shares_are_independent_of_the_secret():
    """Over a small prime, the joint distribution of t − 1 shares is uniform whatever the secret:
    a chi-square test on many draws (it would catch a zero or reused coefficient)."""
    from pfpl.secure import shamir

    p, draws = 17, 20000
    for secret in (0, 11):
        counts = np.zeros((p, p))
        for _ in range(draws):
            s1, s2, _ = shamir.split(secret, 3, 3, prime=p)
            counts[s1, s2] += 1
        assert stats.chisquare(counts.ravel()).pvalue > 1e-3
    leaky = np.zeros((p, p))
    for _ in range(draws):  # a broken sharing whose degree is too low (t − 1 shares reveal the secret)
        s1, s2 = shamir.split(11, 1, 2, prime=p)
        leaky[s1, s2] += 1
    assert stats.chisquare(leaky.ravel()).pvalue < 1e-12
