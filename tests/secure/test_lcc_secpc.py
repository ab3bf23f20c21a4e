"""Lagrange coded computing and SecPC: decoding from every responder set of the recovery size,
clean failure below it, masks that hide the secret from T workers, secure clustering equal to its
plaintext reference, and the adaptive rule finding planted clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from pfpl.secure.field import PRIMES, Field, from_residues, is_prime, to_residues
from pfpl.secure.lcc import LCC, RecoveryError
from pfpl.secure.secpc import (
    ClusteringError,
    SecPCSettings,
    adjusted_rand_index,
    cluster,
    plain_distances,
    project,
    quantize,
)
from pfpl.secure.secpc_protocol import InMemorySecPC, SecPCServer


def test_the_rns_primes_are_primes_and_crt_round_trips_signed_integers():
    assert all(is_prime(p) and p < 2**24 for p in PRIMES) and len(set(PRIMES)) == 3
    x = np.array([0, 1, -1, 2**40 + 5, -(2**45)], dtype=np.int64)
    assert list(from_residues(to_residues(x))) == [int(v) for v in x]


def test_field_matmul_is_exact_modular_arithmetic():
    f = Field(PRIMES[0])
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, f.p, (5, 40000)), rng.integers(0, f.p, (40000, 3))
    expected = (a.astype(object) @ b.astype(object)) % f.p
    assert (f.matmul(a, b) == expected).all()


@pytest.mark.parametrize("k, t", [(1, 1), (2, 1), (2, 2)])
def test_lcc_decodes_every_responder_set_of_the_recovery_size(k, t):
    """f(Y) = Y ⊙ Y + 3·Y (degree 2) on every slice, from every subset of workers of exactly the
    recovery threshold; one worker fewer is one clear error."""
    field = Field(PRIMES[1])
    workers = 2 * (k + t - 1) + 2
    code = LCC(field, k, t, workers)
    rng = np.random.default_rng(k + t)
    slices = rng.integers(0, field.p, (k, 3, 4))
    shares = code.encode(slices)

    def f(y):
        return (field.mul(y, y) + 3 * y) % field.p

    results = {j: f(shares[j]) for j in range(workers)}
    expected = np.stack([f(s) for s in slices])
    need = code.recovery_threshold(2)
    for chosen in itertools.combinations(range(workers), need):
        assert np.array_equal(code.decode({j: results[j] for j in chosen}, 2), expected)
    with pytest.raises(RecoveryError) as err:
        code.decode({j: results[j] for j in range(need - 1)}, 2)
    assert "recovery threshold" in str(err.value) and "\n" not in str(err.value)


def test_t_shares_are_independent_of_the_secret():
    """Over F_17 with K = 1, T = 2: any 2 workers' shares are jointly uniform whatever the secret
    (χ² over many encodings); with T = 1 the same two shares determine the secret (the test's power)."""
    field = Field(17)
    draws = 15000

    def joint(code, secret, workers=(0, 1)):
        counts = np.zeros((17, 17))
        for _ in range(draws):
            s = code.encode(np.array([[secret]]))
            counts[int(s[workers[0], 0]), int(s[workers[1], 0])] += 1
        return counts.ravel()

    private = LCC(field, 1, 2, 4)
    for secret in (0, 9):
        assert stats.chisquare(joint(private, secret)).pvalue > 1e-3
    leaky = LCC(field, 1, 1, 4)
    assert stats.chisquare(joint(leaky, 9)).pvalue < 1e-12


def _planted(groups: int = 4, per: int = 6, dim: int = 48, spread: float = 0.35, seed: int = 0):
    """``groups`` orthogonal unit centres (squared distance 2 apart) with Gaussian spread around them."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, groups)))[0].T * np.sqrt(dim)
    truth = np.repeat(np.arange(groups), per)
    return centres[truth] + spread * rng.standard_normal((len(truth), dim)), truth


def test_secure_distances_equal_the_plaintext_integers():
    feats, _ = _planted()
    s = SecPCSettings(slices=2, privacy=1)
    x = quantize(project(feats, s.projection_dim, s.seed), s.frac_bits)
    transport = InMemorySecPC(feats, s, absent_workers={0, 5, 7})  # three workers never answer
    server = SecPCServer(len(x), s)
    for phase in (server._keys, server._share, server._hold):
        phase(transport.deliver)
    assignment = np.arange(len(x)) % 3
    d_sec, e_sec = server.distances(transport.deliver, assignment)
    d, e = plain_distances(x, assignment)
    assert (d_sec == d).all() and (e_sec == e).all()
    assert server.stats.answering == tuple(c for c in range(len(x)) if c not in {0, 5, 7})


def test_secure_clustering_returns_the_plaintext_assignment():
    feats, truth = _planted(groups=5, per=4, spread=0.5, seed=3)
    s = SecPCSettings(initial_clusters=2)
    secure, oracle = cluster(feats, s, secure=True)
    plain, _ = cluster(feats, s, secure=False)
    assert np.array_equal(secure.assignment, plain.assignment) and secure.history == plain.history
    assert oracle.rounds == secure.iterations and oracle.bytes_per_client > 0


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_the_adaptive_rule_finds_the_planted_number_of_clusters(groups):
    feats, truth = _planted(groups=groups, per=5, seed=groups)
    for start in (1, 2, 6):
        settings = SecPCSettings(initial_clusters=start, split_threshold=0.25, merge_threshold=0.1)
        result, _ = cluster(feats, settings, secure=False)
        assert result.assignment.max() + 1 == groups, (start, result.history)
        assert adjusted_rand_index(result.assignment, truth) == pytest.approx(1.0)


def test_too_many_absent_workers_fail_the_clustering_cleanly():
    feats, _ = _planted(per=2)
    s = SecPCSettings(slices=2, privacy=1)
    with pytest.raises(ClusteringError, match="recovery threshold") as err:  # 4 < 2·(2+1−1)+1 = 5 answer
        cluster(feats, s, secure=True, absent_workers=set(range(len(feats) - 4)))
    assert "\n" not in str(err.value)


def test_adjusted_rand_index_against_a_hand_computed_value():
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == pytest.approx(1.0)
    # the classic example: ARI of [0,0,0,1,1,1] vs [0,0,1,1,2,2] is 0.24242...
    assert adjusted_rand_index(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(
        8 / 33, abs=1e-9
    )
