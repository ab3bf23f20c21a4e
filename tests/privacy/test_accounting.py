"""Privacy accounting: cross-checks between accountants, monotonicity, composition, calibration."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from pfpl.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    RDP_ORDERS,
    Mechanism,
    PrivacyConfigError,
    calibrate_noise,
    epsilon,
    epsilon_curve,
    validate,
)

DELTA = 1e-5
# (σ, q, steps, δ)
CASES = [
    (1.1, 0.01, 1000, 1e-5),
    (4.0, 1.0, 100, 1e-5),
    (2.0, 0.05, 200, 1e-6),
    (1.1, 256 / 60000, 14062, 1e-5),
]
# fewer steps for PRV speed
PRV_CASES = [(1.1, 0.01, 300, 1e-5), (4.0, 1.0, 50, 1e-5), (2.0, 0.05, 100, 1e-6)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- agreement between accountants


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_opacus_rdp_matches_dp_accounting_rdp(sigma, q, steps, delta):
    m = Mechanism(sigma, q, steps)
    assert rel(epsilon(m, delta, "rdp"), epsilon(m, delta, "dp_accounting")) < 1e-6


def test_rdp_is_exactly_opacus_rdp_accountant():
    mechs = [Mechanism(1.1, 0.01, 300), Mechanism(2.5, 0.02, 100), Mechanism(1.1, 0.01, 200)]
    acc = RDPAccountant()
    acc.history = [(1.1, 0.01, 300), (2.5, 0.02, 100), (1.1, 0.01, 200)]
    assert rel(epsilon(mechs, DELTA, "rdp"), acc.get_epsilon(DELTA, alphas=list(RDP_ORDERS))) < 1e-12


def test_heterogeneous_composition_agrees_across_rdp_accountants():
    mechs = [Mechanism(1.5, 0.02, 150), Mechanism(6.0, 1.0, 10), Mechanism(2.5, 0.1, 50)]
    assert rel(epsilon(mechs, DELTA, "rdp"), epsilon(mechs, DELTA, "dp_accounting")) < 1e-6


def test_rdp_accountants_diverge_slightly_at_small_noise():
    # the libraries sum the fractional-order series differently (dp-accounting adds |terms|, an
    # upper bound; opacus keeps the signs), which shows when a small fractional order is optimal
    m = Mechanism(0.5, 0.01, 1000)  # ε ≈ 15.46 vs 15.47
    e_opacus, e_google = epsilon(m, DELTA, "rdp"), epsilon(m, DELTA, "dp_accounting")
    assert e_opacus < e_google <= 1.01 * e_opacus


@pytest.mark.parametrize("sigma,q,steps,delta", PRV_CASES)
def test_prv_is_tighter_than_rdp_but_same_ballpark(sigma, q, steps, delta):
    m = Mechanism(sigma, q, steps)
    e_rdp, e_prv = epsilon(m, delta, "rdp"), epsilon(m, delta, "prv")
    assert e_prv <= e_rdp + PRV_EPS_ERROR
    assert e_prv >= e_rdp / 2


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_prv_falls_back_to_rdp_instead_of_exhausting_memory():
    m = Mechanism(0.3, 1.0, 1000)  # ε in the thousands: PRV's grid would need ~1e8 points
    with pytest.warns(RuntimeWarning, match="PRV discretisation too large"):
        e = epsilon(m, DELTA, "prv")
    assert e == epsilon(m, DELTA, "rdp")


def test_classic_mnist_dp_sgd_figure():
    # opacus / TF-privacy MNIST example: σ=1.1, batch 256 of 60000, 60 epochs, δ=1e-5 (ε ≈ 2.6-3.0
    # depending on the RDP→(ε,δ) conversion used)
    m = Mechanism(1.1, 256 / 60000, int(60 * 60000 / 256))
    for acc in ("rdp", "dp_accounting"):
        assert 2.5 <= epsilon(m, 1e-5, acc) <= 3.3


# ---------------------------------------------------------------- monotonicity


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_more_noise_gives_smaller_epsilon(accountant):
    eps = [epsilon(Mechanism(s, 0.02, 100), DELTA, accountant) for s in (0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_more_steps_gives_larger_epsilon(accountant):
    eps = [epsilon(Mechanism(1.5, 0.02, t), DELTA, accountant) for t in (10, 100, 1000)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_smaller_sample_rate_gives_smaller_epsilon(accountant):
    eps = [epsilon(Mechanism(2.0, q, 50), DELTA, accountant) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_two_identical_mechanisms_compose_like_double_steps(accountant):
    one = Mechanism(1.3, 0.02, 100, name="u")
    other = Mechanism(1.3, 0.02, 100, name="v")
    doubled = Mechanism(1.3, 0.02, 200)
    e_two = epsilon([one, other], DELTA, accountant)
    assert rel(e_two, epsilon(doubled, DELTA, accountant)) < 1e-9
    assert e_two > epsilon(one, DELTA, accountant) + 0.05


def test_composition_of_different_mechanisms_exceeds_each_and_ignores_order():
    a, b = Mechanism(1.0, 0.01, 300), Mechanism(3.0, 1.0, 10)
    e_ab = epsilon([a, b], DELTA)
    assert e_ab > max(epsilon(a, DELTA), epsilon(b, DELTA))
    assert e_ab == pytest.approx(epsilon([b, a], DELTA), rel=1e-12)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_zero_noise_means_no_privacy(accountant):
    assert epsilon(Mechanism(0.0, 0.1, 10), DELTA, accountant) == math.inf
    assert epsilon([Mechanism(1.0, 0.1, 10), Mechanism(0.0, 1.0, 1)], DELTA, accountant) == math.inf


def test_nothing_released_costs_nothing():
    assert epsilon([], DELTA) == 0.0
    assert epsilon(Mechanism(1.0, 0.1, 0), DELTA) == 0.0


# ---------------------------------------------------------------- curves


def test_epsilon_curve_is_cumulative():
    rounds = [[Mechanism(1.0, 0.02, 20, "u"), Mechanism(1.5, 0.02, 20, "v")] for _ in range(10)]
    curve = epsilon_curve(rounds, DELTA, "rdp")
    assert len(curve) == 10
    assert all(a < b for a, b in zip(curve, curve[1:]))
    assert curve[0] == pytest.approx(epsilon(rounds[0], DELTA), rel=1e-12)
    assert curve[-1] == pytest.approx(epsilon([m for r in rounds for m in r], DELTA), rel=1e-12)
    assert curve[-1] == pytest.approx(epsilon([Mechanism(1.0, 0.02, 200), Mechanism(1.5, 0.02, 200)], DELTA))


@pytest.mark.parametrize("accountant", ["prv", "dp_accounting"])
def test_epsilon_curve_other_accountants(accountant):
    rounds = [[Mechanism(1.2, 0.05, 20)]] * 3
    curve = epsilon_curve(rounds, DELTA, accountant)
    assert all(a < b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(epsilon(Mechanism(1.2, 0.05, 60), DELTA, accountant), rel=1e-9)


def test_epsilon_curve_stays_infinite_after_a_noiseless_round():
    rounds = [[Mechanism(1.0, 0.1, 10)], [Mechanism(0.0, 0.1, 10)], [Mechanism(1.0, 0.1, 10)]]
    curve = epsilon_curve(rounds, DELTA)
    assert math.isfinite(curve[0]) and curve[1] == curve[2] == math.inf


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "accountant,target,q,steps",
    [("rdp", 3.0, 0.01, 1000), ("dp_accounting", 1.0, 0.05, 300), ("rdp", 8.0, 1.0, 10), ("prv", 4.0, 1.0, 20)],
)
def test_calibrate_noise_round_trip(accountant, target, q, steps):
    sigma = calibrate_noise(target, DELTA, q, steps, accountant)
    e = epsilon(Mechanism(sigma, q, steps), DELTA, accountant)
    assert e <= target
    assert e >= 0.98 * target  # the smallest such σ, not just some σ
    assert epsilon(Mechanism(0.97 * sigma, q, steps), DELTA, accountant) > target


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibrate_noise_agrees_with_opacus():
    ours = calibrate_noise(3.0, DELTA, 0.01, 1000)
    # opacus bisects to 0.01 in ε on its (smaller) default order set, so it lands slightly higher
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=1000)
    assert ours <= theirs <= 1.05 * ours


def test_calibrate_noise_for_several_mechanisms():
    one = calibrate_noise(2.0, DELTA, 0.02, 200)
    two = calibrate_noise(2.0, DELTA, 0.02, 200, n_mechanisms=2)
    assert two > one * 1.1
    pair = [Mechanism(two, 0.02, 200, "u"), Mechanism(two, 0.02, 200, "v")]
    assert 0.98 * 2.0 <= epsilon(pair, DELTA) <= 2.0


def test_calibrate_noise_non_private_target():
    assert calibrate_noise(math.inf, DELTA, 0.01, 100) == 0.0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,shown",
    [
        ({"epsilon": 0}, "epsilon=0"),
        ({"epsilon": -1.0}, "epsilon=-1.0"),
        ({"epsilon": float("nan")}, "epsilon=nan"),
        ({"delta": 0.0}, "delta=0.0"),
        ({"delta": 1}, "delta=1"),
        ({"delta": 1.5}, "delta=1.5"),
        ({"clip": 0}, "clip=0"),
        ({"clip": -2.0}, "clip=-2.0"),
        ({"sample_rate": 0.0}, "sample_rate=0.0"),
        ({"sample_rate": 1.01}, "sample_rate=1.01"),
        ({"delta": "1e-5\nx"}, "delta='1e-5\\nx'"),
    ],
)
def test_validate_rejects_bad_values_in_one_line(kwargs, shown):
    with pytest.raises(PrivacyConfigError) as info:
        validate(**kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert shown in msg and "\n" not in msg and "must" in msg


def test_validate_accepts_good_values():
    validate(epsilon=math.inf, delta=1e-5, clip=1.0, sample_rate=1.0)
    validate(epsilon=0.1, delta=0.5, clip=1e-3, sample_rate=1e-6)


@pytest.mark.parametrize(
    "call,shown",
    [
        (lambda: Mechanism(-1.0, 0.1, 10), "noise_multiplier=-1.0"),
        (lambda: Mechanism(1.0, 0.0, 10), "sample_rate=0.0"),
        (lambda: Mechanism(1.0, 0.1, -5), "steps=-5"),
        (lambda: Mechanism(1.0, 0.1, 2.5), "steps=2.5"),
        (lambda: epsilon(Mechanism(1.0, 0.1, 10), 2.0), "delta=2.0"),
        (lambda: epsilon(Mechanism(1.0, 0.1, 10), DELTA, "moments"), "accountant='moments'"),
        (lambda: calibrate_noise(-1.0, DELTA, 0.1, 10), "epsilon=-1.0"),
        (lambda: calibrate_noise(1.0, DELTA, 1.5, 10), "sample_rate=1.5"),
        (lambda: calibrate_noise(1.0, DELTA, 0.1, 10, n_mechanisms=0), "n_mechanisms=0"),
        (lambda: epsilon_curve([[Mechanism(1.0, 0.1, 10)]], 0.0), "delta=0.0"),
    ],
)
def test_public_functions_validate_their_inputs(call, shown):
    with pytest.raises(PrivacyConfigError) as info:
        call()
    assert shown in str(info.value) and "\n" not in str(info.value)
