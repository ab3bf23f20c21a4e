"""Membership-audit metrics: hand-computed ROC/AUC, invariances, and the empirical ε bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from pfpl.audit.metrics import (
    attack_accuracy,
    empirical_epsilon,
    roc_auc,
    roc_curve,
    summarize,
    tpr_at_fpr,
)

# sklearn's documented roc_curve example: members are the two higher-labelled samples.
SK_SCORES = [0.1, 0.4, 0.35, 0.8]
SK_MEMBER = [False, False, True, True]


def _null(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=2 * n), np.r_[np.ones(n, bool), np.zeros(n, bool)]


def _separated(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return np.r_[1 + rng.random(n), rng.random(n)], np.r_[np.ones(n, bool), np.zeros(n, bool)]


def test_roc_curve_and_auc_match_hand_computation():
    fpr, tpr, thr = roc_curve(SK_SCORES, SK_MEMBER)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert roc_auc(SK_SCORES, SK_MEMBER) == pytest.approx(0.75)
    # Ties count ½: member pairs (2>1, 2=2, 3>1, 3>2) → 3.5 / 4.
    assert roc_auc([1, 2, 2, 3], [False, True, False, True]) == pytest.approx(0.875)


def test_auc_is_mann_whitney_u_and_trapezoidal_area():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, 500).astype(float)  # many ties
    member = rng.random(500) < 0.4
    n1, n0 = member.sum(), (~member).sum()
    u = stats.mannwhitneyu(scores[member], scores[~member]).statistic
    auc = roc_auc(scores, member)
    assert auc == pytest.approx(u / (n1 * n0), abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, member)
    assert auc == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_monotone_transform_leaves_metrics_unchanged():
    rng = np.random.default_rng(4)
    member = rng.random(1000) < 0.5
    scores = rng.normal(size=1000) + 0.7 * member
    for f in (np.exp, lambda x: 3 * x**3 - 1, lambda x: stats.rankdata(x)):
        assert roc_auc(f(scores), member) == pytest.approx(roc_auc(scores, member), abs=1e-12)
        assert tpr_at_fpr(f(scores), member, 0.01) == tpr_at_fpr(scores, member, 0.01)
    assert roc_auc(-scores, member) == pytest.approx(1 - roc_auc(scores, member))


def test_tpr_at_fpr_is_conservative_without_interpolation():
    assert tpr_at_fpr(SK_SCORES, SK_MEMBER, 0.49) == 0.5  # interpolation would give ~1
    assert tpr_at_fpr(SK_SCORES, SK_MEMBER, 0.5) == 1.0
    assert tpr_at_fpr(SK_SCORES, SK_MEMBER, 0.0) == 0.5
    # A member tied with a non-member at the top cannot be flagged alone.
    assert tpr_at_fpr([5, 5, 1], [True, False, True], 0.0) == 0.0
    # Tied member/non-member: the ROC goes diagonally from (0, ½) to (½, 1); no point in between.
    assert tpr_at_fpr([3, 2, 2, 1], [True, True, False, False], 0.25) == 0.5


def test_attack_accuracy_is_best_threshold_balanced_accuracy():
    assert attack_accuracy(SK_SCORES, SK_MEMBER) == pytest.approx(0.75)
    # 1 member among 10, uninformative scores: plain accuracy would be 0.9, balanced is 0.5.
    assert attack_accuracy(np.zeros(10), np.r_[True, np.zeros(9, bool)]) == pytest.approx(0.5)


def test_perfect_separation_bound_is_positive_and_grows_with_sample_size():
    bounds = []
    for n in (50, 200, 1000):
        s, m = _separated(n)
        assert roc_auc(s, m) == 1.0 and tpr_at_fpr(s, m, 0.01) == 1.0
        eps = empirical_epsilon(s, m, delta=1e-5)
        assert 0 < eps["eps_lower_bound"] <= eps["eps_point_estimate"] < math.inf
        bounds.append(eps["eps_lower_bound"])
    assert bounds[0] < bounds[1] < bounds[2]


def test_too_few_samples_give_zero_bound():
    for n in (1, 2, 3, 5):
        s, m = _separated(n)
        assert empirical_epsilon(s, m, delta=1e-5)["eps_lower_bound"] == 0.0


def test_random_scores_give_auc_half_and_zero_bound_over_seeds():
    for seed in range(20):
        s, m = _null(seed)
        assert abs(roc_auc(s, m) - 0.5) < 0.05
        assert empirical_epsilon(s, m, delta=1e-5, seed=seed)["eps_lower_bound"] == 0.0


def test_naive_max_over_thresholds_would_be_positive_by_chance():
    """Why empirical_epsilon splits the data: per-threshold CP limits maximised over all thresholds
    of the same data give a positive "lower bound" for some purely random seeds."""

    def naive(s: np.ndarray, m: np.ndarray, delta: float = 1e-5, level: float = 0.975) -> float:
        order = np.argsort(-s)
        fp, fn = np.cumsum(~m[order]), m.sum() - np.cumsum(m[order])
        n0, n1 = (~m).sum(), m.sum()
        fpr = np.where(fp < n0, stats.beta.ppf(level, fp + 1, np.maximum(n0 - fp, 1)), 1.0)
        fnr = np.where(fn < n1, stats.beta.ppf(level, fn + 1, np.maximum(n1 - fn, 1)), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = np.maximum(np.log((1 - delta - fnr) / fpr), np.log((1 - delta - fpr) / fnr))
        return float(max(np.nanmax(eps), 0.0))

    assert any(naive(*_null(seed)) > 0 for seed in range(20))


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Exact ε(δ) of N(0,1) vs N(μ,1), i.e. μ-GDP (Dong, Roth & Su 2019)."""

    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0, 50)


def test_bound_never_exceeds_true_epsilon_of_a_gaussian_mechanism():
    mu, delta = 2.0, 1e-5
    true_eps = _gdp_epsilon(mu, delta)
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        m = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
        s = rng.normal(size=4000) + mu * m
        eps = empirical_epsilon(s, m, delta, seed=seed)
        assert 0 < eps["eps_lower_bound"] < true_eps
        assert eps["eps_lower_bound"] <= eps["eps_point_estimate"]


def test_lower_bound_below_point_estimate_and_summary():
    for s, m in (_null(0), _separated(300), (np.array(SK_SCORES), np.array(SK_MEMBER))):
        eps = empirical_epsilon(s, m, delta=1e-5)
        assert 0 <= eps["eps_lower_bound"] <= eps["eps_point_estimate"]
    s, m = _separated(300)
    out = summarize(torch.tensor(s), torch.tensor(m), delta=1e-5)
    assert set(out) == {
        "auc",
        "tpr_at_1pct_fpr",
        "tpr_at_0.1pct_fpr",
        "accuracy",
        "eps_lower_bound",
        "eps_point_estimate",
        "n_members",
        "n_nonmembers",
    }
    assert out["auc"] == 1.0 and out["accuracy"] == 1.0 and out["n_members"] == out["n_nonmembers"] == 300
    assert out["eps_lower_bound"] == empirical_epsilon(s, m, delta=1e-5)["eps_lower_bound"] > 0


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="member"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="length"):
        roc_auc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 0.2], [True, False])
    with pytest.raises(ValueError, match="delta"):
        empirical_epsilon(SK_SCORES, SK_MEMBER, delta=1.0)
