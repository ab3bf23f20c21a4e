"""Ring headroom: the training-set-size coordinate, the values and the distributed noise's tails fit
Z_2^k together, proved at config time; no legal setting wraps the ring silently."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pfpl.errors import ConfigError, ProtocolError
from pfpl.privacy import skellam
from pfpl.secure.aggregator import SecureAggregator, SecureSettings
from pfpl.secure.encoding import FixedPoint
from pfpl.streams import Streams


def _agg(ring_bits=64, frac_bits=24, noise_bits=16, noise_std=0.0, weighting="size", n=4):
    settings = SecureSettings(ring_bits=ring_bits, frac_bits=frac_bits, noise_bits=noise_bits, graph="full")
    return SecureAggregator(settings, weighting=weighting, noise_std=noise_std, clients=Streams(0, None))


def test_the_reviewers_wrapping_settings_are_refused_at_config_time_with_the_ring_that_fits():
    counted = _agg(ring_bits=16, frac_bits=4)
    with pytest.raises(ConfigError) as err:  # 100 × 700 records decoded as 4,464 before
        counted.check_ring(100, 51, 700)
    assert "secure.ring_bits = 16" in str(err.value) and "size coordinate" in str(err.value)
    fits = int(str(err.value).rsplit(" ", 1)[-1])
    _agg(ring_bits=fits, frac_bits=4).check_ring(100, 51, 700)  # the hint is right
    with pytest.raises(ConfigError):
        _agg(ring_bits=fits - 1, frac_bits=4).check_ring(100, 51, 700)
    noisy = _agg(ring_bits=20, noise_bits=18, noise_std=1.0)  # 218 of 2,000 coordinates wrapped before
    with pytest.raises(ConfigError, match="distributed noise") as err:
        noisy.check_ring(10, 2000, 20)
    assert "\n" not in str(err.value)


def test_the_noise_tail_bound_covers_the_sampled_noise():
    """Chernoff's bound at 2^-40 over the coordinates is above every sampled |Sk(λ)| (and not vacuous)."""
    from pfpl.streams import Purpose

    lam = 2.0**20
    draws = Streams(3).draws(Purpose.DP_SHARE, 0, 0, 0)
    sample = skellam.sample(lam, (200_000,), draws).numpy()
    bound = skellam.tail_bound(lam, 200_000)
    assert np.abs(sample).max() < bound < 12 * math.sqrt(2 * lam)
    assert skellam.tail_bound(lam, 1, 0.5) < bound  # fewer coordinates, looser probability: less room


CORNERS = list(
    itertools.product(
        (16, 24, 40, 63, 64),  # ring_bits (63: the largest below 64, whose half needs uint64 arithmetic)
        (0, 12, 24, 48),  # frac_bits
        (None, 4, 16, 30),  # noise_bits (None: no distributed DP)
        (2, 9),  # clients
        (1, 700),  # records per client
        ("size", "equal"),
    )
)


def _corner(ring_bits, frac_bits, noise_bits, n, size, weighting) -> str:
    """One corner: 'refused' at config time, 'refused at encoding', or 'summed' without a wrap."""
    agg = _agg(ring_bits, frac_bits, noise_bits or 16, 1.0 if noise_bits else 0.0, weighting)
    dim = 8
    try:
        agg.check_ring(n, agg.vector_length(dim), size, value_bound=1.0)
    except ConfigError as err:
        assert "\n" not in str(err) and "secure.ring_bits" in str(err)
        return "refused"
    fp = FixedPoint(ring_bits, agg.scale())
    t = agg.settings.threshold_for(n)
    reserve = agg.noise_reserve(n, t, agg.vector_length(dim))
    weight = size if weighting == "size" else 1.0
    top = fp.bound(n, reserve) / weight  # the largest real value one client may send
    rng = np.random.default_rng(ring_bits + frac_bits)
    values = [rng.choice([-1.0, 1.0], dim) * min(top * 0.999, 1.0) for _ in range(n)]
    try:
        vectors = [agg.encode(v, size, c, n, t, 0, 0, 0) for c, v in enumerate(values)]
    except ProtocolError:
        return "refused at encoding"
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for v in vectors:
        total = total + v
    total = total & fp.modulus_mask
    decoded = fp.decode(total[:dim]) * agg.scale()
    truth = sum(np.rint(v * weight * agg.scale()) for v in values)
    assert np.abs(decoded - truth).max() <= reserve + 1e-6, (ring_bits, frac_bits, noise_bits, n, size, weighting)
    if weighting == "size":
        assert int(total[dim]) == n * size
    return "summed"


def test_no_legal_setting_wraps_the_ring():
    """Every corner of the allowed ranges: either refused at config time (one line), or every value the
    clients may send — the largest each may, by the encoder's own bound — is refused at encoding or
    summed without a wrap: the decoded sum is the true sum within rounding and the noise's room."""
    outcomes = [_corner(*corner) for corner in CORNERS]
    assert outcomes.count("summed") > 100 and outcomes.count("refused") > 20  # both kinds of corner exist


def test_secpc_refuses_a_federation_its_primes_cannot_hold():
    """SecPC recovers exact distances modulo three ~2^24 primes: 6,000 clients at 12 fractional bits
    used to decode a centre distance of 4 as 0.525; such a config is now one line, and the range
    constant is the product of the primes the field uses."""
    from pfpl.config import SECPC_RANGE, load_config
    from pfpl.secure.field import PRIMES

    assert int(np.prod([int(p) for p in PRIMES], dtype=object)) == SECPC_RANGE
    with pytest.raises(ConfigError, match="would wrap") as err:
        load_config(None, ["federation.n_clients=6000", "secfpp.frac_bits=12", "train.methods=['secfpp']"])
    assert "\n" not in str(err.value)
    load_config(None, ["federation.n_clients=1000", "secfpp.frac_bits=12", "train.methods=['secfpp']"])
