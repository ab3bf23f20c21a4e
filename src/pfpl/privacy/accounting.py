"""Privacy accounting for DP-SGD-style (subsampled) Gaussian mechanisms.

Every figure here comes from a maintained library, never from hand-written RDP formulas:

- ``"rdp"``: opacus's RDP analysis of the Poisson-subsampled Gaussian (Mironov et al. 2019), the
  same computation as :class:`opacus.accountants.RDPAccountant`, converted to (ε, δ) with the
  Balle et al. 2020 bound;
- ``"prv"``: :class:`opacus.accountants.PRVAccountant` (Gopi et al. 2021), a numerical, tighter
  accountant; it returns the upper end of its error interval (``eps_error`` = ``PRV_EPS_ERROR``);
- ``"dp_accounting"``: Google's :class:`dp_accounting.rdp.RdpAccountant` on
  ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``, an independent cross-check of ``"rdp"``.

Both RDP accountants use the same orders (``RDP_ORDERS``), so they agree to ~1e-7 relative or better
whenever the optimal order is an integer or ≳ 3 (moderate ε); when a small fractional order wins
(small σ with q < 1, large ε) they differ by up to ~1e-2 relative, because opacus sums the
fractional-order series with signed binomial coefficients and dp-accounting with their absolute
values (an upper bound, so dp-accounting is then the more conservative of the two).

Adjacency: add/remove-one-record, sample-level (one training example), with Poisson subsampling at
rate q when q < 1. With q = 1 no amplification is claimed: every step is charged as a full Gaussian
mechanism (a fixed batch or the whole dataset each step). All mechanisms handed to one call are
composed adaptively because they are assumed to touch the same records (sequential composition);
disjoint data (e.g. different clients) must be accounted separately.

Noise multipliers are σ = noise std / clip norm, so σ = 0 means no privacy (ε = inf).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from pfpl.errors import PrivacyConfigError

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "Mechanism",
    "PrivacyConfigError",
    "calibrate_noise",
    "epsilon",
    "epsilon_curve",
    "validate",
]

ACCOUNTANTS = ("rdp", "prv", "dp_accounting")

#: RDP orders shared by the opacus and dp-accounting RDP accountants: opacus's defaults extended
#: with dp-accounting's large orders (which tighten small-ε bounds considerably).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)

#: Absolute ε error of the PRV accountant (opacus's default); the reported ε is the upper end.
PRV_EPS_ERROR = 0.01

#: PRV discretisations with more grid points than this fall back to RDP (an upper bound on the
#: same quantity) instead of exhausting memory; this only happens for very large ε.
PRV_MAX_POINTS = 4_000_000

#: calibrate_noise gives up above this σ (the target is then unreachable in practice).
MAX_NOISE_MULTIPLIER = 1e6

_EXTREME_ORDER_WARNING = "Optimal order is the"
_PRV_FALLBACK_WARNING = "PRV discretisation too large"


def _bad(name: str, value: object, allowed: str) -> PrivacyConfigError:
    return PrivacyConfigError(f"{name}={value!r} is invalid: {allowed}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def validate(epsilon=None, delta=None, clip=None, sample_rate=None, *, noise_multiplier=None, steps=None) -> None:
    """Checks privacy settings (None = not checked) for add/remove-one-record, sample-level DP.

    Raises PrivacyConfigError."""
    if epsilon is not None and not (_is_real(epsilon) and epsilon > 0):
        raise _bad("epsilon", epsilon, "must be > 0 (inf allowed, meaning non-private)")
    if delta is not None and not (_is_real(delta) and 0 < delta < 1):
        raise _bad("delta", delta, "must satisfy 0 < delta < 1")
    if clip is not None and not (_is_real(clip) and 0 < clip < math.inf):
        raise _bad("clip", clip, "clip norm must be finite and > 0")
    if sample_rate is not None and not (_is_real(sample_rate) and 0 < sample_rate <= 1):
        raise _bad("sample_rate", sample_rate, "must satisfy 0 < q <= 1 (1 = no subsampling amplification)")
    if noise_multiplier is not None and not (_is_real(noise_multiplier) and 0 <= noise_multiplier < math.inf):
        raise _bad("noise_multiplier", noise_multiplier, "must be finite and >= 0 (0 = no privacy)")
    if steps is not None and not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 0):
        raise _bad("steps", steps, "must be an integer >= 0")


@dataclass(frozen=True)
class Mechanism:
    """A Gaussian mechanism run `steps` times with Poisson sampling rate q (q = 1: no amplification);
    add/remove-one adjacency."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    name: str = ""

    def __post_init__(self) -> None:
        validate(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=self.steps)
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))


# --------------------------------------------------------------------------------------------
# internals


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant={accountant!r} is invalid: must be one of {', '.join(ACCOUNTANTS)}")


def _as_list(mechanisms: Mechanism | Sequence[Mechanism]) -> list[Mechanism]:
    items = [mechanisms] if isinstance(mechanisms, Mechanism) else list(mechanisms)
    for m in items:
        if not isinstance(m, Mechanism):
            raise PrivacyConfigError(f"mechanism={m!r} is invalid: must be a pfpl.privacy.accounting.Mechanism")
        # Mechanism is frozen, but re-check in case it was built around __init__.
        validate(sample_rate=m.sample_rate, noise_multiplier=m.noise_multiplier, steps=m.steps)
    return items


def _history(mechanisms: Sequence[Mechanism]) -> list[tuple[float, float, int]]:
    """opacus-style history [(σ, q, steps)], merging equal (σ, q) (composition is commutative)."""
    merged: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        if m.steps > 0:
            key = (m.noise_multiplier, m.sample_rate)
            merged[key] = merged.get(key, 0) + m.steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    rdp = np.asarray(rdp, dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def _eps_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    # Exactly RDPAccountant.get_privacy_spent (opacus's compute_rdp is linear in steps), with the
    # per-step RDP cached so that curves and calibration stay cheap.
    rdp = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in history)
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return max(0.0, float(eps))


def _prv_points(history: list[tuple[float, float, int]], delta_error: float) -> float:
    """About how many grid points PRVAccountant would allocate, to avoid exhausting memory.

    Mirrors opacus's domain rule (``compute_safe_domain_size``: RDP ε at δ_err/4 of the whole
    composition and at δ_err/(8·steps) of single steps, plus 3) with the cached RDP values.
    """
    total = sum(steps for _, _, steps in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING)
        half_width = _eps_rdp(history, delta_error / 4)
        for sigma, q, _ in history:
            half_width = max(half_width, _eps_rdp([(sigma, q, 1)], delta_error / (8 * total)))
    half_width = max(half_width, PRV_EPS_ERROR) + 3
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _eps_prv(history: list[tuple[float, float, int]], delta: float) -> float:
    delta_error = delta / 1000  # opacus's default
    if _prv_points(history, delta_error) > PRV_MAX_POINTS:
        warnings.warn(
            f"{_PRV_FALLBACK_WARNING} for this (very large ε) composition; reporting the RDP bound instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return _eps_rdp(history, delta)
    acc = PRVAccountant()
    acc.history = list(history)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # log(1 - q) = -inf when q = 1; the order warning comes from the domain-size heuristic
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING)
        eps = acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    return max(0.0, float(eps))


def _dp_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def _eps_dp_accounting(history: list[tuple[float, float, int]], delta: float) -> float:
    event = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(_dp_event(sigma, q), steps) for sigma, q, steps in history]
    )
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(event)
    return max(0.0, float(acc.get_epsilon(delta)))


def _eps_history(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        return _eps_rdp(history, delta)
    if accountant == "prv":
        return _eps_prv(history, delta)
    return _eps_dp_accounting(history, delta)


# --------------------------------------------------------------------------------------------
# public API


def epsilon(mechanisms: Mechanism | Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of the adaptive composition of all mechanisms on the same records
    (add/remove-one, sample-level, Poisson subsampling if q < 1)."""
    validate(delta=delta)
    _check_accountant(accountant)
    return _eps_history(_history(_as_list(mechanisms)), delta, accountant)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    n_mechanisms: int = 1,
) -> float:
    """Smallest σ (to ~1e-6 relative; 1e-3 for PRV) whose n composed (σ, q, steps) mechanisms reach ε ≤ target at δ
    (add/remove-one, sample-level, Poisson if q < 1)."""
    validate(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
    _check_accountant(accountant)
    if not (isinstance(n_mechanisms, numbers.Integral) and not isinstance(n_mechanisms, bool) and n_mechanisms >= 1):
        raise _bad("n_mechanisms", n_mechanisms, "must be an integer >= 1")
    if math.isinf(target_epsilon) or steps == 0:
        return 0.0

    total_steps = int(n_mechanisms) * int(steps)  # n identical mechanisms compose like one with n·steps

    def eps(sigma: float) -> float:
        return _eps_history([(sigma, float(sample_rate), total_steps)], delta, accountant)

    rtol = 1e-3 if accountant == "prv" else 1e-6
    with warnings.catch_warnings():
        # probing extreme σ makes the optimal RDP order an end point; the bound stays valid
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING)
        warnings.filterwarnings("ignore", message=_PRV_FALLBACK_WARNING)  # an upper bound: still safe
        # PRV is tighter than RDP, so the RDP answer is a good upper starting point
        hi = calibrate_noise(target_epsilon, delta, sample_rate, total_steps) if accountant == "prv" else 1.0
        lo = 0.0
        while eps(hi) > target_epsilon:
            lo, hi = hi, 2 * hi
            if hi > MAX_NOISE_MULTIPLIER:
                raise _bad("target_epsilon", target_epsilon, f"unreachable with sigma <= {MAX_NOISE_MULTIPLIER:g}")
        if lo == 0.0:
            lo = hi / 2
            while eps(lo) <= target_epsilon:
                hi, lo = lo, lo / 2
                if lo < 1e-12:  # ε -> inf as σ -> 0, so this is not reached for a finite target
                    lo = 0.0
                    break
        # invariant: eps(lo) > target >= eps(hi)
        while hi - lo > rtol * hi:
            mid = (lo + hi) / 2
            if eps(mid) <= target_epsilon:
                hi = mid
            else:
                lo = mid
    return hi


def epsilon_curve(
    mechanism_per_round: Sequence[Sequence[Mechanism]], delta: float, accountant: str = "rdp"
) -> list[float]:
    """Cumulative ε at δ after each round, composing every round so far on the same records
    (add/remove-one, sample-level, Poisson if q < 1)."""
    validate(delta=delta)
    _check_accountant(accountant)
    rounds = [_as_list(r) for r in mechanism_per_round]
    so_far: list[Mechanism] = []
    curve = []
    for round_mechanisms in rounds:
        so_far.extend(round_mechanisms)
        curve.append(_eps_history(_history(so_far), delta, accountant))
    return curve


@functools.lru_cache(maxsize=65536)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    return _eps_history(list(history), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _cached_curve_epsilon(
    history: tuple[tuple[float, float, int], ...], curves: tuple[tuple[tuple[float, ...], int], ...], delta: float
) -> float:
    """ε at δ of Gaussian events and RDP curves at the integer orders of :mod:`pfpl.privacy.skellam`."""
    from pfpl.privacy.skellam import INTEGER_ORDERS

    orders = list(INTEGER_ORDERS)
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        if sigma == 0:
            return math.inf
        total += steps * np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
    for curve, count in curves:
        total += count * np.asarray(curve)
    if not np.isfinite(total).any():
        return math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING)
        eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return max(0.0, float(eps))


class Accountant:
    """A stateful accountant, as Opacus's: ``step(noise_multiplier, sample_rate, steps)`` records a
    (subsampled) Gaussian mechanism that ran on one party's records, ``step_rdp(curve, steps)`` any
    other mechanism by its RDP curve at the integer orders of :mod:`pfpl.privacy.skellam` (the
    Skellam noise of distributed DP), and ``epsilon(delta)`` composes them (add/remove-one,
    sample-level). Each client holds one for its own records; equal histories share one cached ε, so
    thousands of clients cost a handful of computations. With RDP curves present, every event is
    accounted at the integer orders (the chosen ``accountant`` applies to Gaussian-only histories)."""

    def __init__(self, accountant: str = "rdp"):
        _check_accountant(accountant)
        self.accountant = accountant
        self.history: dict[tuple[float, float], int] = {}
        self.curves: dict[tuple[float, ...], int] = {}

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        validate(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps)
        if steps:
            key = (float(noise_multiplier), float(sample_rate))
            self.history[key] = self.history.get(key, 0) + int(steps)

    def step_rdp(self, curve: Sequence[float], steps: int = 1) -> None:
        from pfpl.privacy.skellam import INTEGER_ORDERS

        if len(curve) != len(INTEGER_ORDERS):
            raise PrivacyConfigError(f"an RDP curve needs {len(INTEGER_ORDERS)} values (one per integer order)")
        validate(steps=steps)
        if steps:
            key = tuple(float(x) for x in curve)
            self.curves[key] = self.curves.get(key, 0) + int(steps)

    def epsilon(self, delta: float) -> float:
        validate(delta=delta)
        items = tuple(sorted((sigma, q, n) for (sigma, q), n in self.history.items()))
        if self.curves:
            return _cached_curve_epsilon(items, tuple(sorted(self.curves.items())), float(delta))
        return _cached_epsilon(items, float(delta), self.accountant)

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant,
            "history": [[s, q, n] for (s, q), n in self.history.items()],
            "curves": [[list(c), n] for c, n in self.curves.items()],
        }

    @classmethod
    def from_state(cls, state: dict) -> Accountant:
        acc = cls(state["accountant"])
        for sigma, q, n in state["history"]:
            acc.step(sigma, q, int(n))
        for curve, n in state.get("curves", []):
            acc.step_rdp(curve, int(n))
        return acc
