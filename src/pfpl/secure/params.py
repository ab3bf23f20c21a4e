"""SecAgg+'s graph degree k and threshold t from the threat model and the dropout rate (pure
functions: numpy/scipy only, so the config checks can call them without the numerical stack).

The graph (:mod:`pfpl.secure.graph`) is a k-regular Harary graph over a public random permutation:
each client is joined to the k/2 next and k/2 previous ones on a cycle; k ≥ n − 1 is the full graph.
A client's secrets are shared among its k + 1 holders (its neighbours and itself), t of whom must
answer. Each participant is assumed to drop out of an instance independently with probability p.

Three rules, each refusing something a server could exploit:

- **strict majority** (2t > k + 1): two disjoint sets of one client's honest holders cannot both
  reach t, so a server alone cannot obtain both its self-mask seed and its mask key, whatever it
  tells whom. With c colluding holders handing over both shares, a server that tells different
  holders different survivor sets (no consistency round) succeeds once 2t − (k + 1) ≤ c: that
  equivocation is outside pfpl's threat model (docs/privacy.md), and distributed DP's default sizing
  (every share carries the full noise) keeps ε even then;
- **even degree**: the Harary graph has k/2 on each side; an odd degree used to be rounded down
  silently, so clients had fewer holders than configured;
- **no decodable cut** (sparse graph: t ≥ k/2 + 2): a cycle cut by two runs of ≥ k/2 absent
  clients leaves arcs of survivors with no edge between them, and the server would learn each arc's
  partial sum. The first survivor after such a run has at most k/2 + 1 surviving holders (itself and
  the k/2 after it), so with t ≥ k/2 + 2 a cut instance fails cleanly instead of decoding — whether
  the absences are random (:func:`split_bound` bounds how often they cut the cycle) or chosen by a
  server that ignores some clients on purpose. With t = k/2 + 1 a cut decodes: at n = 12, degree 4
  and threshold 0.6 (t = 3) four absent clients leave two 4-client partial sums; at n = 40 with the
  default degree 14 and threshold 0.51 (t = 8), fourteen leave two 13-client sums.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from scipy import stats

from pfpl.errors import ConfigError

DEFAULT_SPLIT_TARGET = 2.0**-20


class Choice(NamedTuple):
    """What :func:`choose_report` found: the degree and threshold, their bounds, and whether the
    failure target was met (when it is not, the result is the most robust configuration there is)."""

    degree: int
    threshold: int
    failure: float
    split: float
    meets_failure_target: bool


def is_full(n: int, degree: int) -> bool:
    return degree >= n - 1


def holders(n: int, degree: int) -> int:
    """The size of a neighbourhood with its owner: k + 1 (n on the full graph)."""
    return n if is_full(n, degree) else degree + 1


def min_threshold(n: int, degree: int) -> int:
    """The smallest threshold the rules allow: a strict majority of n on the full graph, k/2 + 2 on
    the Harary graph (a strict majority, plus one so that a cut arc cannot decode)."""
    return n // 2 + 1 if is_full(n, degree) else degree // 2 + 2


def failure_bound(n: int, degree: int, threshold: int, dropout: float) -> float:
    """An upper bound on the probability that one instance cannot unmask: every survivor's seed and
    every dropped client's key needs ``threshold`` answering holders among its k + 1, each of which
    answers with probability 1 − p; a union bound over the n clients of that binomial tail (on the
    full graph all n events are one: fewer than t of the n answer). Client-side aborts (too few
    shares, too few survivors) only happen inside these events, so they are covered."""
    if threshold > holders(n, degree):
        return 1.0
    tail = float(stats.binom.cdf(threshold - 1, holders(n, degree), 1.0 - dropout))
    return tail if is_full(n, degree) else min(1.0, n * tail)


def split_bound(n: int, degree: int, dropout: float, threshold: int | None = None) -> float:
    """An upper bound on the probability that the survivors' induced graph is disconnected (the server
    would learn each part's sum); with ``threshold``, that it is disconnected *and* still decodes.

    On the Harary graph (h = k/2) survivors split only if at least two maximal runs of ≥ h
    consecutive non-survivors lie on the cycle. Each run starts with an event A_i = {position i − 1
    survives, i … i + h − 1 do not}, of probability (1 − q)·q^h; two runs' events have disjoint
    windows (starts at cyclic distance ≥ h + 1: n − k − 1 choices for the second start), hence are
    independent, so P ≤ n(n − k − 1)/2 · (1 − q)²q^k with q ≤ p the probability of not surviving
    (maximised over q ≤ p). The full graph never splits; with t ≥ h + 2 a split never decodes (the
    first survivor after a run has at most h + 1 surviving holders)."""
    if is_full(n, degree):
        return 0.0
    if threshold is not None and threshold >= degree // 2 + 2:
        return 0.0
    q = min(dropout, degree / (degree + 2))
    return float(min(1.0, n * (n - degree - 1) / 2 * (1 - q) ** 2 * q**degree))


def _violations(n: int, degree: int, threshold: int) -> list[str]:
    """Why (degree, threshold) breaks a rule, as short phrases (empty: it keeps them all)."""
    out = []
    k = min(degree, n - 1)
    if not is_full(n, degree) and (degree < 2 or degree % 2):
        out.append("odd")
    if not 1 <= threshold <= holders(n, k):
        out.append("range")
    elif 2 * threshold <= holders(n, k):
        out.append("majority")
    elif not is_full(n, degree) and threshold < degree // 2 + 2:
        out.append("cut")
    return out


def _degrees(n: int) -> list[int]:
    """Candidate degrees, smallest first: even sparse degrees, then the full graph."""
    return [*range(2, n - 1, 2), max(n - 1, 0)]


def _thresholds(n: int, degree: int, threshold_fraction: float | None) -> list[int]:
    if threshold_fraction is not None:
        t = math.ceil(threshold_fraction * holders(n, degree) - 1e-12)
        return [t] if not _violations(n, degree, t) else []
    return list(range(min_threshold(n, degree), holders(n, degree) + 1))


def choose_report(
    n: int,
    dropout: float,
    failure_target: float,
    split_target: float = DEFAULT_SPLIT_TARGET,
    threshold_fraction: float | None = None,
) -> Choice:
    """The smallest even degree (capped at the full graph, n − 1) with a threshold that keeps the
    rules and meets ``split_target`` and ``failure_target``, and at that degree the smallest such
    threshold: the rules already stop the server, so the remaining choice is robustness (the failure
    bound grows with t; a larger t buys tolerance of more colluders, which ``threshold_fraction``
    asks for: t = ceil(fraction·(k + 1)) instead). If no degree meets the failure target, the full
    graph with its most robust allowed threshold, ``meets_failure_target`` False."""
    if n < 1:
        raise ConfigError(f"secure aggregation needs at least one client, not {n}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"federation.dropout = {dropout}: secure parameters need a dropout in [0, 1)")
    for degree in _degrees(n):
        ts = _thresholds(n, degree, threshold_fraction)
        ts = [t for t in ts if split_bound(n, degree, dropout, t) <= split_target]
        if not ts:
            continue
        failures = [failure_bound(n, degree, t, dropout) for t in ts]
        meeting = [t for t, f in zip(ts, failures) if f <= failure_target]
        if meeting:
            t = min(meeting)
            return Choice(degree, t, failure_bound(n, degree, t, dropout), split_bound(n, degree, dropout), True)
    full = max(n - 1, 0)
    ts = _thresholds(n, full, threshold_fraction)
    if not ts:
        raise ConfigError(
            f"secure.threshold = {threshold_fraction}: ceil(fraction·n) is not a strict majority of {n} clients; "
            "use a fraction above 0.5"
        )
    t = min(ts)
    return Choice(full, t, failure_bound(n, full, t, dropout), 0.0, False)


def choose(
    n: int,
    dropout: float,
    failure_target: float,
    split_target: float = DEFAULT_SPLIT_TARGET,
    threshold_fraction: float | None = None,
) -> tuple[int, int]:
    """``(degree, threshold)`` of :func:`choose_report` (which also says whether the failure target
    was met and the bounds reached)."""
    c = choose_report(n, dropout, failure_target, split_target, threshold_fraction)
    return c.degree, c.threshold


def smallest_degree(n: int, dropout: float, split_target: float, threshold_fraction: float) -> int:
    """The smallest degree for which ``threshold_fraction`` keeps every rule (the full graph if none)."""
    for degree in _degrees(n):
        if any(split_bound(n, degree, dropout, t) <= split_target for t in _thresholds(n, degree, threshold_fraction)):
            return degree
    return max(n - 1, 0)


def check(n: int, degree: int, threshold: int, dropout: float, split_target: float = DEFAULT_SPLIT_TARGET) -> None:
    """Refuse, with one :class:`~pfpl.errors.ConfigError` line naming ``secure.degree`` /
    ``secure.threshold``, an odd sparse degree, a threshold that is not a strict majority of a
    neighbourhood, or one (t ≤ k/2 + 1 on the Harary graph) with which a cut cycle still decodes;
    a configuration whose bound of a decodable split exceeds ``split_target`` is refused too (with
    the rules above that bound is 0)."""
    problems = _violations(n, degree, threshold)
    k = min(degree, n - 1)
    size = holders(n, k)
    fraction = threshold / size
    fit = smallest_degree(n, dropout, split_target, max(fraction, 0.5 + 1e-9))
    where = f"secure.degree = {degree}, secure.threshold = {threshold} of {size} holders, {n} clients"
    if "odd" in problems:
        raise ConfigError(
            f"secure.degree = {degree} for {n} clients: the Harary graph needs an even degree of at least 2 "
            f"(k/2 neighbours on each side; it used to be rounded down silently) or at least {n - 1} "
            f"(the full graph); the smallest degree that fits is {fit}"
        )
    if "range" in problems:
        raise ConfigError(f"{where}: the threshold must be between 1 and the {size} holders")
    if "majority" in problems:
        raise ConfigError(
            f"{where}: 2t ≤ k + 1, so two disjoint sets of one client's holders could each reach t (its seed "
            f"and its key both revealed); use secure.threshold ≥ {size // 2 + 1}"
        )
    leak = split_bound(n, k, dropout)
    if "cut" in problems:
        h = degree // 2
        raise ConfigError(
            f"{where}: with t ≤ k/2 + 1 = {h + 1} an arc of survivors cut off by two runs of {h} absent clients "
            f"still unmasks on its own and the server learns its partial sum (random drops: probability ≤ "
            f"{leak:.2g} per instance at dropout {dropout}, target {split_target:.2g}; a server ignoring chosen "
            f"clients: at will); use secure.threshold ≥ {h + 2} (a fraction above {(h + 1) / size:.3f}); "
            f"the smallest degree that fits this threshold's fraction is {fit}"
        )
    reached = split_bound(n, k, dropout, threshold)
    if reached > split_target:  # unreachable under the rules above; kept so the target is always enforced
        raise ConfigError(
            f"{where}: a split of the survivors decodes with probability ≤ {reached:.2g} per instance, above the "
            f"target {split_target:.2g}; the smallest degree that fits is {fit}"
        )


def table(ns: list[int], dropouts: list[float], failure_target: float = 0.01) -> list[Choice]:
    """:func:`choose_report` for every (n, dropout), for docs and reports."""
    return [choose_report(n, p, failure_target) for n in ns for p in dropouts]
