"""Mechanism streams: secret ones are unpredictable without the party's secret, reproducible with it,
the same for a client alone or in a batch, and never drawn for a party whose secret is not held."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pfpl.streams import MECHANISM, SERVER, Purpose, SeededDraws, Streams, stream


def test_secret_streams_differ_between_parties_and_runs_and_repeat_with_the_secret():
    a = Streams.create(0, [0, 1], secret=True)
    b = Streams.create(0, [0, 1], secret=True)
    draw = lambda s, c: s.draws(Purpose.SAMPLE_NOISE, 3, 1, c).normal((64,))
    assert not torch.equal(draw(a, 0), draw(b, 0))  # the same config seed, fresh secrets
    assert not torch.equal(draw(a, 0), draw(a, 1))
    assert torch.equal(draw(a, 0), draw(Streams(0, a.secrets), 0))  # the secret reproduces them
    assert not torch.equal(draw(a, 0), a.draws(Purpose.SAMPLE_NOISE, 3, 2, 0).normal((64,)))  # another step
    seeded = SeededDraws(stream(0, Purpose.SAMPLE_NOISE, 3, 1, 0)).normal((64,))
    assert not torch.equal(draw(a, 0), seeded)  # not what the config seed gives
    assert torch.equal(draw(Streams(0), 0), seeded)  # seeded mode: exactly the config seed's stream


def test_a_client_draws_the_same_alone_and_in_a_batch():
    everyone = Streams.create(7, range(4), secret=True)
    rows = everyone.rows(Purpose.POISSON, [0, 2, 3], 5, 1)
    alone = everyone.subset([2]).rows(Purpose.POISSON, [2], 5, 1)
    assert torch.equal(rows[1].uniform(100), alone[0].uniform(100))


def test_a_party_never_draws_another_partys_noise_and_public_draws_are_refused():
    node = Streams.create(0, range(6), secret=True).subset([1, 3])
    with pytest.raises(KeyError, match="no secret for party 0"):
        node.draws(Purpose.SAMPLE_NOISE, 0, 0, 0)
    server = Streams.create(0, [SERVER], secret=True)
    with pytest.raises(KeyError):
        server.draws(Purpose.DP_SHARE, 0, 0, 1)
    with pytest.raises(ValueError, match="public draw"):
        node.draws(Purpose.FACTORIZATION, 0, 0, 1)
    assert Purpose.FACTORIZATION not in MECHANISM and Purpose.DP_SHARE in MECHANISM


def test_streams_restore_in_place():
    a = Streams.create(0, [0], secret=True)
    b = Streams.create(0, [0], secret=True)
    before = a.draws(Purpose.BATCH_ORDER, 1, 0, 0).permutation(50)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.draws(Purpose.BATCH_ORDER, 1, 0, 0).permutation(50), before)
    with pytest.raises(ValueError, match="32 bytes"):
        Streams(0, {0: b"short"})


def test_secret_draws_have_the_distributions_the_mechanisms_assume():
    d = Streams.create(0, [0], secret=True).draws(Purpose.SAMPLE_NOISE, 0, 0, 0)
    z = d.normal((200_000,)).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert stats.kstest(z * 1.1, "norm").pvalue < 1e-6  # the test can fail: a 10% wider normal is caught
    u = d.uniform(100_000).numpy()
    assert u.min() >= 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4
    p = d.permutation(1000).numpy()
    assert sorted(p.tolist()) == list(range(1000)) and not np.array_equal(p, np.arange(1000))
    k = d.poisson(30.0, (100_000,)).numpy()
    assert k.mean() == pytest.approx(30, rel=0.01) and k.var() == pytest.approx(30, rel=0.03)
