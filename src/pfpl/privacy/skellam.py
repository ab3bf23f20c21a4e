"""The Skellam mechanism for distributed DP under secure aggregation (Agarwal, Kairouz & Liu,
NeurIPS 2021): each client adds integer noise Sk(λ_i) = Poisson(λ_i) − Poisson(λ_i) to its
fixed-point encoded vector; sums of Skellam noise are Skellam (Sk(Σλ_i)), so the decoded sum
carries noise of variance 2·Σλ_i and nobody ever sees an un-noised vector or sum.

Accounting is by Rényi DP at integer orders:

- :func:`skellam_rdp`: the paper's bound for a d-dimensional integer query of L2 sensitivity Δ₂
  and L1 sensitivity Δ₁ under Sk(λ) noise per coordinate,
  ε(α) ≤ α·Δ₂²/(4λ) + min(((2α − 1)·Δ₂² + 6·Δ₁)/(16λ²), 3·Δ₁/(4λ));
- :func:`poisson_subsampled_rdp`: Zhu & Wang's (ICML 2019) upper bound for Poisson subsampling of
  *any* mechanism with a known RDP curve, for records sampled with probability q;
- the tests check both against exact computations (Rényi divergences of shifted Skellam pmfs, the
  tight subsampled-Gaussian RDP of opacus).

Fixed-point rounding makes the integer query's sensitivity slightly larger than the real one's:
``Δ₂ ≤ scale·Δ + √d`` and ``Δ₁ ≤ √d·scale·Δ + d`` (each coordinate's rounding moves by < 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

from pfpl.streams import Draws

#: integer Rényi orders for Skellam accounting (the subsampling bound needs integers)
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 384, 512, 768, 1024)


def integer_sensitivity(l2: float, scale: float, dim: int) -> tuple[float, float]:
    """(Δ₂, Δ₁) of the rounded, scaled query when the real query moves by at most ``l2`` in L2."""
    root = math.sqrt(dim)
    return scale * l2 + root, root * scale * l2 + dim


def skellam_rdp(orders, l2: float, l1: float, lam: float) -> np.ndarray:
    """RDP ε(α) of adding Sk(λ) per coordinate to an integer query with sensitivities (Δ₂, Δ₁)."""
    a = np.asarray(orders, dtype=np.float64)
    if lam <= 0:
        return np.full_like(a, np.inf)
    correction = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * lam**2), 3 * l1 / (4 * lam))
    return a * l2**2 / (4 * lam) + correction


def gaussian_rdp(orders, noise_multiplier: float) -> np.ndarray:
    """RDP of the Gaussian mechanism at sensitivity 1: α / (2σ²)."""
    a = np.asarray(orders, dtype=np.float64)
    return np.full_like(a, np.inf) if noise_multiplier == 0 else a / (2 * noise_multiplier**2)


def poisson_subsampled_rdp(orders, q: float, rdp: np.ndarray) -> np.ndarray:
    """Zhu & Wang (2019), general upper bound for Poisson subsampling at rate q of a mechanism whose
    RDP at the integer orders ``orders`` is ``rdp`` (``orders`` must contain 2, 3, …, max order)."""
    orders = [int(a) for a in orders]
    if q >= 1:
        return np.asarray(rdp, dtype=np.float64)
    eps = dict(zip(orders, np.asarray(rdp, dtype=np.float64)))
    out = []
    for alpha in orders:
        if alpha > max(o for o in orders if all(k in eps for k in range(2, o + 1))):
            out.append(np.inf)
            continue
        terms = [(alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)]
        terms.append(
            float(special.gammaln(alpha + 1) - special.gammaln(3) - special.gammaln(alpha - 1))
            + 2 * math.log(q)
            + (alpha - 2) * math.log1p(-q)
            + eps[2]
        )
        for ell in range(3, alpha + 1):
            log_binom = float(special.gammaln(alpha + 1) - special.gammaln(ell + 1) - special.gammaln(alpha - ell + 1))
            terms.append(
                math.log(3) + log_binom + (alpha - ell) * math.log1p(-q) + ell * math.log(q) + (ell - 1) * eps[ell]
            )
        out.append(float(special.logsumexp(terms)) / (alpha - 1))
    return np.asarray(out)


def tail_bound(lam: float, coordinates: int, probability: float = 2.0**-40) -> int:
    """An integer x with P(max over ``coordinates`` of |Sk(λ)| ≥ x) ≤ ``probability``: Chernoff's
    bound on the Skellam's moment-generating function exp(2λ(cosh t − 1)), at its optimum
    t = asinh(x / 2λ), P(Sk ≥ x) ≤ exp(−x·asinh(x/2λ) + 2λ(√(1 + (x/2λ)²) − 1)), union over both
    signs and every coordinate (what the ring must leave room for)."""
    if lam <= 0:
        return 0

    def log_tail(x: float) -> float:
        r = x / (2 * lam)
        return -x * math.asinh(r) + 2 * lam * (math.sqrt(1 + r * r) - 1)

    target = math.log(probability / (2 * max(1, coordinates)))
    lo, hi = 0.0, max(1.0, 2 * math.sqrt(2 * lam))
    while log_tail(hi) > target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if log_tail(mid) <= target else (mid, hi)
    return int(math.ceil(hi))


def sample(lam: float, shape: tuple[int, ...], draws: Draws) -> torch.Tensor:
    """Sk(λ) integer noise: the difference of two Poisson(λ) draws (int64), from a party's own draws."""
    if lam <= 0:
        return torch.zeros(shape, dtype=torch.int64)
    return (draws.poisson(lam, shape) - draws.poisson(lam, shape)).to(torch.int64)
