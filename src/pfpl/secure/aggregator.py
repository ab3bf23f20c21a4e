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
vector, sized so that the threshold's worth of survivors alone already carry the full variance; the
fixed-point scale is chosen so that this noise has integer std 2^noise_bits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pfpl.messages import Contributions, contributed, group_sum
from pfpl.privacy import skellam
from pfpl.secure.encoding import FixedPoint
from pfpl.secure.graph import default_degree, neighbours
from pfpl.secure.protocol import run_in_memory
from pfpl.streams import Purpose, stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureSettings:
    ring_bits: int = 64
    frac_bits: int = 24
    threshold: float = 0.6  # fraction of a neighbourhood (with the client itself) needed to unmask
    graph: str = "sparse"
    degree: int | None = None
    noise_bits: int = 16
    seed: int = 0

    def degree_for(self, n: int) -> int:
        if self.graph == "full" or n <= 2:
            return max(1, n - 1)
        return min(n - 1, self.degree or default_degree(n))

    def threshold_for(self, n: int) -> int:
        """Shares needed to unmask, out of a neighbourhood of ``degree + 1`` holders."""
        return max(1, math.ceil(self.threshold * (self.degree_for(n) + 1)))


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

    # ---- the Aggregator protocol -----------------------------------------------------------------
    def coefficients(self, c: Contributions) -> torch.Tensor:
        if self.weighting == "equal":
            return (1.0 / self._denominator(c)[c.groups.to(c.values.device)]).to(c.values.dtype)
        sizes = c.sizes.to(c.values.device, torch.float64)
        groups = c.groups.to(c.values.device)
        return (sizes / group_sum(sizes, groups, c.n_groups)[groups]).to(c.values.dtype)

    def releases(self, c: Contributions) -> torch.Tensor:
        if self.noise_std > 0 and self.weighting == "equal":
            return torch.ones(c.n_groups, dtype=torch.bool, device=c.values.device)
        return contributed(c)

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
        """Σλ of the Skellam noise in a decoded sum when only the threshold's survivors remain."""
        if self.noise_std == 0:
            return 0.0
        return (2.0**self.settings.noise_bits) ** 2 / 2  # variance 2λ = (scale·std)²

    def __call__(self, c: Contributions, gen: torch.Generator) -> torch.Tensor:
        shape = c.values.shape[1:]
        out = torch.zeros(c.n_groups, *shape, dtype=c.values.dtype, device=c.values.device)
        values = c.values.flatten(1).detach().to("cpu", torch.float64).numpy()
        for g in range(c.n_groups):
            out[g] = self._group(c, g, values, gen).reshape(shape).to(out)
        return out

    # ---- one group: planned by the server, encoded by each client, decoded by the server -----------
    def plan_group(self, c: Contributions, g: int) -> GroupPlan | None:
        """Who takes part in group g's protocol instance (None: nobody), with its threshold and graph.
        Clients that dropped before their masked input take part until they drop."""
        rows = [i for i in range(len(c.clients)) if int(c.groups[i]) == g]
        ids = [int(c.clients[i]) for i in rows]
        drops = {k: phase for k, (phase, group) in (c.drops or {}).items() if group == g}
        lost = [k for k in drops if k not in ids]
        everyone = sorted(ids + list(lost))
        if not everyone:
            return None
        n = len(everyone)
        graph_seed = int(stream(self.settings.seed, Purpose.PROTOCOL, c.round, c.step, -1, c.index).initial_seed())
        graph = neighbours(everyone, self.settings.degree_for(n), graph_seed % 2**32)
        return GroupPlan(rows, ids, lost, everyone, drops, self.settings.threshold_for(n), graph)

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
        fixed point, its share of the distributed noise from its own stream, and its size (size weighting)."""
        v = np.asarray(value, dtype=np.float64).reshape(-1)
        if self.weighting == "equal" and self.client_clip > 0:
            v = v * min(1.0, self.client_clip / max(float(np.linalg.norm(v)), 1e-12))
        v = v * (float(size) if self.weighting == "size" else 1.0)
        fp = FixedPoint(self.settings.ring_bits, self.scale())
        q = fp.quantize(v, summands=summands)
        lam_share = self.lam_total() / threshold
        if lam_share > 0:
            noise_gen = stream(self.settings.seed, Purpose.PROTOCOL, round_index, step, client, index)
            q = q + skellam.sample(lam_share, (len(v),), noise_gen).numpy()
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

    def _group(self, c: Contributions, g: int, values: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        dim = values.shape[1]
        plan = self.plan_group(c, g)
        if plan is None:
            return self.empty(c, g, dim, gen)
        n = len(plan.everyone)
        vectors = {
            client: self.encode(values[i], float(c.sizes[i]), client, n, plan.threshold, c.round, c.step, c.index)
            for i, client in zip(plan.rows, plan.ids)
        }
        for client in plan.lost:  # they take part until they drop; their vector is never used
            vectors[client] = np.zeros(self.vector_length(dim), dtype=np.uint64)
        transcript = run_in_memory(vectors, plan.threshold, plan.graph, self.settings.ring_bits, plan.drops)
        if transcript.rejected:
            log.warning("secure aggregation: %d client(s) rejected this exchange", len(transcript.rejected))
        return self.decode(transcript.total, c, g, dim)

    def empty(self, c: Contributions, g: int, dim: int, gen: torch.Generator) -> torch.Tensor:
        """Nobody took part in group g: nothing is summed; with client-level DP the server must still
        release noise (it adds the threshold's worth itself, as a participant-free round has no clients)."""
        if self.weighting == "equal" and self.noise_std > 0:
            noise = skellam.sample(self.lam_total(), (dim,), gen).to(torch.float64) / self.scale()
            return noise / float(self._denominator(c)[g])
        return torch.zeros(dim, dtype=torch.float64)
