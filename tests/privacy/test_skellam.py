"""Distributed DP's accounting, checked against exact computations: the Skellam RDP bound against
Rényi divergences of shifted Skellam pmfs, the general Poisson-subsampling bound against opacus's
tight subsampled Gaussian, and the plan's charges under secure aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import special
from scipy.stats import skellam as sk

from pfpl.privacy import skellam
from pfpl.privacy.accounting import Accountant
from pfpl.streams import SeededDraws


def exact_divergence(alpha: int, shift: int, lam: float) -> float:
    """D_α(Sk(λ) + shift ‖ Sk(λ)), summed over the support (accurate for λ ≤ ~10³)."""
    width = int(40 * math.sqrt(2 * lam)) + abs(shift) + 60
    x = np.arange(-width, width)
    lp, lq = sk.logpmf(x - shift, lam, lam), sk.logpmf(x, lam, lam)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(special.logsumexp(alpha * lp[ok] + (1 - alpha) * lq[ok]) / (alpha - 1))


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0, 100.0, 1000.0])
def test_the_skellam_bound_holds_in_one_dimension(lam):
    for shift in (1, 3, 10, 30):
        for alpha in (2, 3, 8, 32, 128):
            exact = exact_divergence(alpha, shift, lam)
            assert skellam.skellam_rdp([alpha], shift, shift, lam)[0] >= exact - 1e-9, (lam, shift, alpha)


def test_the_skellam_bound_holds_for_vectors_and_is_not_vacuous():
    """A product of coordinates: the exact divergence is the sum over coordinates; the bound, from the
    vector's L2 and L1 norms, must cover it, and sit within a small factor of it."""
    rng = np.random.default_rng(0)
    lam = 50.0
    for _ in range(20):
        shifts = rng.integers(-6, 7, size=8)
        l2, l1 = float(np.linalg.norm(shifts)), float(np.abs(shifts).sum())
        for alpha in (2, 8, 32):
            exact = sum(exact_divergence(alpha, int(s), lam) for s in shifts if s)
            bound = skellam.skellam_rdp([alpha], l2, l1, lam)[0]
            assert exact - 1e-9 <= bound <= 2 * exact + 1e-3


@pytest.mark.parametrize("sigma, q", [(0.8, 0.01), (1.0, 0.1), (2.0, 0.05), (4.0, 0.5)])
def test_the_general_subsampling_bound_covers_the_tight_gaussian_one(sigma, q):
    orders = list(skellam.INTEGER_ORDERS)
    tight = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
    general = skellam.poisson_subsampled_rdp(orders, q, skellam.gaussian_rdp(orders, sigma))
    assert (general >= tight * (1 - 1e-9)).all()
    assert (general[:10] < tight[:10] * 10).all()  # an upper bound, not a vacuous one


def test_skellam_noise_is_closed_under_summation():
    gen = SeededDraws(torch.Generator().manual_seed(0))
    shares = sum(skellam.sample(30.0, (200000,), gen) for _ in range(4)).numpy()
    assert shares.dtype == np.int64
    assert shares.var() == pytest.approx(2 * 120.0, rel=0.02)  # Sk(4·30): variance 2·120


def test_an_accountant_composes_gaussian_events_and_rdp_curves():
    orders = skellam.INTEGER_ORDERS
    a = Accountant()
    a.step(2.0, 0.1, 50)
    only_gaussian = a.epsilon(1e-5)
    curve = skellam.poisson_subsampled_rdp(orders, 0.1, skellam.skellam_rdp(orders, 300.0, 3000.0, 2.0**31))
    a.step_rdp(curve, 50)
    assert a.epsilon(1e-5) > only_gaussian
    b = Accountant.from_state(a.state_dict())
    assert b.epsilon(1e-5) == a.epsilon(1e-5)


def test_distributed_dp_reports_at_least_the_gaussian_of_the_same_variance():
    """Under secure aggregation the same σ is accounted through Skellam + the general subsampling bound:
    never below the plaintext Gaussian accounting of the same mechanism."""
    from pfpl.config import load_config
    from pfpl.privacy.plan import MethodLeaves, TrainingShape, plan_privacy

    dp = load_config(None, ["dp.mode=per-sample", "dp.noise_multiplier=2.0"]).dp
    base = dict(
        sizes=(40, 60),
        batch_size=8,
        steps_per_round=5,
        rounds=10,
        sync="step",
        participation=1.0,
        sampling="poisson",
        shared_numel=1024,
    )
    leaves = MethodLeaves("dpfpl", ("u", "v"), ("global",))
    plain = plan_privacy(dp, leaves, TrainingShape(**base))
    secure = plan_privacy(dp, leaves, TrainingShape(**base, secure_noise_bits=16))
    eps = []
    for plan in (plain, secure):
        ledger = Accountant()
        for _ in range(10):
            plan.charge_round(ledger, 40, 5)
        eps.append(ledger.epsilon(1e-5))
    assert math.isfinite(eps[1]) and eps[1] >= eps[0]
