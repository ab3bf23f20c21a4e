"""The engine's secure aggregator: every exchange's shared vectors are summed by the SecAgg+
protocol (:mod:`pfpl.secure.protocol`), one instance per group, so the server decodes only each
group's sum — never one client's update.

What each client submits depends on the weighting the privacy plan asks for:

- ``size`` (FedAvg's weighted mean, no client-level DP): ``n_i · v_i`` and, exactly, ``n_i``; the
  server divides the decoded sum by the decoded Σ n_i of the clients that delivered;
- ``equal`` (client-level DP): ``clip_S(v_i)``, clipped by the client itself; the server divides by
  the expected number of participants D (a public constant), as the plaintext ClientLevelDP does.

Distributed DP: when the plan asks for noise (global DP's std σ_G·C·max_i w_i/B_i and/or
client-level DP's σ_c·S, in units of the sum), every client adds Skellam noise to its integer
vector from its own secret draws (:data:`~pfpl.streams.Purpose.DP_SHARE`), sized so that the
*honest* survivors the protocol guarantees — the threshold t minus the clients that may collude
with the server (``secure.colluders``, default t − 1) — carry the full variance by themselves:
colluders can subtract their own shares, never an honest client's. The fixed-point scale is chosen
so that this noise has integer std 2^noise_bits.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pfpl.errors import ConfigError, ProtocolError
from pfpl.messages import Contributions, contributed, group_sum
from pfpl.privacy import skellam
from pfpl.secure import params
from pfpl.secure.encoding import FixedPoint
from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import InMemoryClients, SecAggServer, SecureAggregationError, run_instances
from pfpl.streams import Draws, Purpose, Streams, stream

log = logging.getLogger(__name__)

#: the probability with which an instance's summed distributed noise may exceed the room kept for it
WRAP_PROBABILITY = 2.0**-40


@dataclass(frozen=True)
class SecureSettings:
    """The protocol's settings. The degree k and threshold t of an instance of n clients are chosen
    from the threat model (:func:`pfpl.secure.params.choose`: the smallest even degree and threshold
    that keep the rules — strict majority, no decodable cut — and meet ``failure_target`` at
    ``dropout``), or taken from ``degree`` / ``threshold`` (a fraction of the k + 1 holders) and
    checked against the same rules (:func:`pfpl.secure.params.check`)."""

    ring_bits: int = 64
    frac_bits: int = 24
    threshold: float | None = None  # fraction of a neighbourhood (with the client itself) needed to unmask
    graph: str = "sparse"
    degree: int | None = None
    noise_bits: int = 16
    seed: int = 0
    colluders: int | None = None  # clients that may collude with the server (None: threshold − 1)
    dropout: float = 0.1  # the dropout rate the chosen parameters must tolerate
    failure_target: float = 0.01  # the chosen parameters' bound on an instance's failure probability

    def params_for(self, n: int) -> tuple[int, int]:
        """(degree, threshold) of an instance of ``n`` clients."""
        return _params(self, n)

    def degree_for(self, n: int) -> int:
        return self.params_for(n)[0]

    def threshold_for(self, n: int) -> int:
        """Shares needed to unmask, out of a neighbourhood of ``degree + 1`` holders."""
        return self.params_for(n)[1]

    def honest_for(self, threshold: int) -> int:
        """Honest clients guaranteed among the survivors of an instance with this threshold: at least
        ``threshold`` clients survive, of which at most ``colluders`` collude with the server."""
        colluders = threshold - 1 if self.colluders is None else min(self.colluders, threshold - 1)
        return max(1, threshold - colluders)


@functools.lru_cache(maxsize=4096)
def _params(s: SecureSettings, n: int) -> tuple[int, int]:
    if n <= 1:
        return max(0, n - 1), 1
    if s.graph == "full" or (s.degree is not None and s.degree >= n - 1):
        t = math.ceil(s.threshold * n - 1e-12) if s.threshold is not None else params.min_threshold(n, n - 1)
        params.check(n, n - 1, t, s.dropout)
        return n - 1, t
    if s.degree is None:
        return params.choose(n, s.dropout, s.failure_target, threshold_fraction=s.threshold)
    t = (
        math.ceil(s.threshold * (s.degree + 1) - 1e-12)
        if s.threshold is not None
        else params.min_threshold(n, s.degree)
    )
    params.check(n, s.degree, t, s.dropout)
    return s.degree, t


@dataclass
class GroupPlan:
    """One group's protocol instance: its delivered rows and clients, the clients that dropped before
    their masked input (``lost``), everyone taking part, the simulated drops, threshold and graph."""

    rows: list[int]
    ids: list[int]
    lost: list[int]
    everyone: list[int]
    drops: dict[int, str]
    threshold: int
    graph: dict[int, list[int]]


@dataclass
class SecureAggregator:
    settings: SecureSettings
    weighting: str = "size"  # "size" or "equal" (client-level DP)
    client_clip: float = 0.0  # clients clip their own contribution to this norm (equal weighting)
    noise_std: float = 0.0  # Gaussian-equivalent std the clients' Skellam shares add to a sum (0: none)
    # the clients' mechanism draws, when this process plays the clients' side (the simulator; a node
    # sets its own clients'): each client's Skellam share comes from its own secret
    clients: Streams | None = None
    # every instance that could not complete (too many dropouts): its group's aggregate was skipped
    failures: list[dict] = field(default_factory=list)
    # what carries the instances' messages to the clients (None: they run in this process); a
    # transport's carrier has ``deliver_for(contributions, plans) -> deliver(phase, inbox)``
    carrier: object | None = None

    # ---- the Aggregator protocol -----------------------------------------------------------------
    def coefficients(self, c: Contributions) -> torch.Tensor:
        if self.weighting == "equal":
            return (1.0 / self._denominator(c)[c.groups.to(c.values.device)]).to(c.values.dtype)
        sizes = c.sizes.to(c.values.device, torch.float64)
        groups = c.groups.to(c.values.device)
        return (sizes / group_sum(sizes, groups, c.n_groups)[groups]).to(c.values.dtype)

    def releases(self, c: Contributions) -> torch.Tensor:
        """Groups whose aggregate the server applies: those that contributed (every group, with
        client-level noise), except those whose instance failed in the last call."""
        if self.noise_std > 0 and self.weighting == "equal":
            out = torch.ones(c.n_groups, dtype=torch.bool, device=c.values.device)
        else:
            out = contributed(c)
        for f in self.failures:
            if (f["round"], f["step"], f["index"]) == (c.round, c.step, c.index):
                out[f["group"]] = False
        return out

    def record_failure(self, c: Contributions, g: int, err: Exception) -> None:
        """An instance that cannot complete skips its group's aggregate (shared parameters unchanged,
        clients keep their local steps); the run goes on and the failure is counted."""
        log.warning(
            "secure aggregation: exchange (round %d, step %d) skipped for group %d: %s", c.round, c.step, g, err
        )
        self.failures.append({"round": c.round, "step": c.step, "index": c.index, "group": g, "reason": str(err)})

    def _denominator(self, c: Contributions) -> torch.Tensor:
        if c.expected is not None:
            return c.expected.to(c.values.device, torch.float64).clamp(min=1e-12)
        ones = torch.ones(len(c.groups), device=c.values.device, dtype=torch.float64)
        return group_sum(ones, c.groups.to(c.values.device), c.n_groups).clamp(min=1)

    def scale(self) -> float:
        """The fixed-point scale: 2^frac_bits, or such that the distributed noise has integer std
        2^noise_bits."""
        if self.noise_std > 0:
            return 2.0**self.settings.noise_bits / self.noise_std
        return 2.0**self.settings.frac_bits

    def lam_total(self) -> float:
        """Σλ of the Skellam noise the guaranteed honest survivors carry in a decoded sum."""
        if self.noise_std == 0:
            return 0.0
        return (2.0**self.settings.noise_bits) ** 2 / 2  # variance 2λ = (scale·std)²

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        """Every group's aggregate, one protocol instance per group, all run together through the
        carrier (:meth:`session`): in memory here, or as messages (a transport's ``carrier``)."""
        shape = c.values.shape[1:]
        out = torch.zeros(c.n_groups, *shape, dtype=c.values.dtype, device=c.values.device)
        for g, value in self.session(c, draws).items():
            out[g] = value.reshape(shape).to(out)
        return out

    def session(self, c: Contributions, draws: Draws) -> dict[int, torch.Tensor]:
        """The aggregate of every group that released one: its instance planned here, its clients'
        vectors encoded and masked by the clients (the carrier's side), its sum decoded here; a group
        nobody joined gets :meth:`empty`, an instance that cannot complete is recorded and skipped."""
        dim = math.prod(c.values.shape[1:])
        out: dict[int, torch.Tensor] = {}
        plans: dict[int, GroupPlan] = {}
        for g in range(c.n_groups):
            plan = self.plan_group(c, g)
            if plan is None:
                out[g] = self.empty(c, g, dim, draws)
            elif self.settings.colluders is not None and plan.threshold <= self.settings.colluders:
                self.record_failure(
                    c,
                    g,
                    SecureAggregationError(
                        f"an instance of {len(plan.everyone)} clients has threshold {plan.threshold}, not above "
                        f"secure.colluders = {self.settings.colluders}: it could not protect its clients against them"
                    ),
                )
            else:
                plans[g] = plan
        carrier = self.carrier or InMemoryCarrier(self)
        # instances the carrier set up ahead of this exchange (their key rounds already ran)
        prepared = carrier.resume(c, plans) if hasattr(carrier, "resume") else {}
        for g, got in list(prepared.items()):
            if isinstance(got, SecureAggregationError):  # it failed while being set up
                self.record_failure(c, g, got)
                del plans[g], prepared[g]
        servers = {
            g: prepared[g][0]
            if g in prepared
            else SecAggServer(
                plan.everyone, plan.graph, plan.threshold, self.vector_length(dim), self.settings.ring_bits
            )
            for g, plan in plans.items()
        }
        resume = {g: got[1:] for g, got in prepared.items()}
        totals, failed = run_instances(servers, carrier.deliver_for(c, plans), resume=resume)
        for g, err in failed.items():
            self.record_failure(c, g, err)
        for g, total in totals.items():
            if servers[g].rejected:
                log.warning("secure aggregation: %d client(s) rejected this exchange", len(servers[g].rejected))
            out[g] = self.decode(total, c, g, dim)
        return out

    # ---- one group: planned by the server, encoded by each client, decoded by the server -----------
    def plan_group(self, c: Contributions, g: int) -> GroupPlan | None:
        """Who takes part in group g's protocol instance (None: nobody), with its threshold and graph.
        Clients that dropped before their masked input take part until they drop."""
        rows = [i for i in range(len(c.clients)) if int(c.groups[i]) == g]
        ids = [int(c.clients[i]) for i in rows]
        drops = {k: phase for k, (phase, group) in (c.drops or {}).items() if group == g}
        lost = [k for k in drops if k not in ids]
        return self._plan(rows, ids, lost, drops, c.round, c.step, c.index)

    def plan_ahead(
        self,
        clients: list[int],
        groups: list[int],
        drops: dict[int, tuple[str, int]],
        round_index: int,
        step: int,
        index: int,
    ) -> dict[int, GroupPlan]:
        """The instances of an exchange before it runs (``clients`` take part, in ``groups``; ``drops``:
        the server's simulated dropouts), as :meth:`plan_group` will plan them once its uploads arrive:
        a transport sets them up ahead so their key rounds ride on earlier round trips."""
        out = {}
        for g in sorted(set(groups)):
            members = [c for c, h in zip(clients, groups) if h == g]
            mine = {k: phase for k, (phase, h) in drops.items() if h == g and k in members}
            lost = [k for k in members if mine.get(k, "unmask") != "unmask"]
            plan = self._plan([], [k for k in members if k not in lost], lost, mine, round_index, step, index)
            if plan is not None:
                out[g] = plan
        return out

    def _plan(self, rows, ids, lost, drops, round_index: int, step: int, index: int) -> GroupPlan | None:
        everyone = sorted(ids + list(lost))
        if not everyone:
            return None
        n = len(everyone)
        graph_seed = int(stream(self.settings.seed, Purpose.PROTOCOL, round_index, step, -1, index).initial_seed())
        graph = neighbours(everyone, self.settings.degree_for(n), graph_seed % 2**32)
        return GroupPlan(rows, ids, list(lost), everyone, drops, self.settings.threshold_for(n), graph)

    def noise_share(self, threshold: int) -> float:
        """λ of one client's Skellam share in an instance with this threshold."""
        return self.lam_total() / self.settings.honest_for(threshold)

    def noise_reserve(self, summands: int, threshold: int, dim: int) -> int:
        """Integer room the summed shares of ``summands`` clients need in every coordinate, except
        with probability :data:`WRAP_PROBABILITY` over the instance's ``dim`` coordinates."""
        lam = self.noise_share(threshold) * summands
        return skellam.tail_bound(lam, dim, WRAP_PROBABILITY) if lam > 0 else 0

    def ring_room(self, ring_bits: int, n: int, dim: int, max_size: int, value_bound: float | None) -> str | None:
        """Why an instance of ``n`` clients cannot fit a 2^ring_bits ring (None: it fits): the
        training-set-size coordinate, the distributed noise's tails and the values' bound must all
        stay below 2^(ring_bits − 1) together."""
        half = 2 ** (ring_bits - 1)
        if self.weighting == "size" and max_size * n >= half:
            return f"the training-set-size coordinate (up to {n} × {max_size} records)"
        reserve = self.noise_reserve(n, self.settings.threshold_for(n), dim)
        if reserve >= half // 2:
            return f"the distributed noise's tails ({reserve} at probability 2^-40, secure.noise_bits)"
        if value_bound is not None and n * value_bound * self.scale() + reserve >= half:
            return f"{n} clipped values of magnitude {value_bound:.3g} at scale {self.scale():.3g}"
        return None

    def check_ring(self, n: int, dim: int, max_size: int, value_bound: float | None = None) -> None:
        """Refuse, before any training, a ring that an instance of up to ``n`` clients could wrap
        (one line naming the keys and the smallest ``secure.ring_bits`` that fits)."""
        why = self.ring_room(self.settings.ring_bits, n, dim, max_size, value_bound)
        if why is None:
            return
        fits = next(
            (k for k in range(self.settings.ring_bits + 1, 65) if not self.ring_room(k, n, dim, max_size, value_bound)),
            None,
        )
        hint = f"the smallest secure.ring_bits that fits is {fits}" if fits else "no ring up to 64 bits fits"
        raise ConfigError(
            f"config error: secure.ring_bits = {self.settings.ring_bits} cannot hold {why} "
            f"(secure.frac_bits = {self.settings.frac_bits}, secure.noise_bits = {self.settings.noise_bits}); {hint}"
        )

    def encode(
        self,
        value: np.ndarray,
        size: float,
        client: int,
        summands: int,
        threshold: int,
        round_index: int,
        step: int,
        index: int,
    ) -> np.ndarray:
        """A client's ring vector for one instance: its own clipping (equal weighting), weighting,
        fixed point, its share of the distributed noise from its own secret draws, and its size (size
        weighting)."""
        v = np.asarray(value, dtype=np.float64).reshape(-1)
        if self.weighting == "equal" and self.client_clip > 0:
            v = v * min(1.0, self.client_clip / max(float(np.linalg.norm(v)), 1e-12))
        v = v * (float(size) if self.weighting == "size" else 1.0)
        fp = FixedPoint(self.settings.ring_bits, self.scale())
        q = fp.quantize(v, summands=summands, reserve=self.noise_reserve(summands, threshold, len(v)))
        if self.weighting == "size" and size * summands >= 2.0 ** (self.settings.ring_bits - 1):
            raise ProtocolError(
                f"a training-set size of {int(size)} cannot be summed over {summands} clients in a "
                f"2^{self.settings.ring_bits} ring (raise secure.ring_bits)"
            )
        lam_share = self.noise_share(threshold)
        if lam_share > 0:
            if self.clients is None:
                raise ValueError("distributed DP needs the clients' mechanism streams (SecureAggregator.clients)")
            draws = self.clients.draws(Purpose.DP_SHARE, round_index, step, client, index)
            q = q + skellam.sample(lam_share, (len(v),), draws).numpy()
        ring = fp.to_ring(q)
        if self.weighting == "size":
            ring = np.concatenate([ring, np.array([int(size)], dtype=np.uint64)])
        return ring

    def vector_length(self, dim: int) -> int:
        return dim + (1 if self.weighting == "size" else 0)

    def decode(self, total: np.ndarray, c: Contributions, g: int, dim: int) -> torch.Tensor:
        """The group's aggregate from the decoded ring sum of its survivors."""
        fp = FixedPoint(self.settings.ring_bits, self.scale())
        summed = fp.decode(total[:dim])
        if self.weighting == "size":
            return torch.from_numpy(summed / max(float(total[dim]), 1e-12))
        return torch.from_numpy(summed / float(self._denominator(c)[g]))

    def empty(self, c: Contributions, g: int, dim: int, draws: Draws) -> torch.Tensor:
        """Nobody took part in group g: nothing is summed; with client-level DP the server must still
        release noise (it adds the full amount itself from its own draws: there is nobody to protect
        from the server, but a receiver must not learn that the round was empty)."""
        if self.weighting == "equal" and self.noise_std > 0:
            noise = skellam.sample(self.lam_total(), (dim,), draws).to(torch.float64) / self.scale()
            return noise / float(self._denominator(c)[g])
        return torch.zeros(dim, dtype=torch.float64)


class InMemoryCarrier:
    """The clients' side of an aggregator's instances, in this process: each client encodes its own
    vector (clipping, weighting, fixed point, its distributed-noise share from its own streams),
    clients that drop before their masked input take part until they drop (with a vector never
    used), and every message passes as a network transport would carry it."""

    def __init__(self, aggregator: SecureAggregator):
        self.a = aggregator

    def deliver_for(self, c: Contributions, plans: dict[int, GroupPlan]):
        a = self.a
        values = c.values.flatten(1).detach().to("cpu", torch.float64).numpy()
        vectors, drops = {}, {}
        for g, plan in plans.items():
            n = len(plan.everyone)
            vectors[g] = {
                client: a.encode(values[i], float(c.sizes[i]), client, n, plan.threshold, c.round, c.step, c.index)
                for i, client in zip(plan.rows, plan.ids)
            }
            for client in plan.lost:  # they take part until they drop; their vector is never used
                vectors[g][client] = np.zeros(a.vector_length(values.shape[1]), dtype=np.uint64)
            drops[g] = plan.drops
        return InMemoryClients(vectors, drops).deliver
