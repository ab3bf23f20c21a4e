"""Server-side DP: aggregators that wrap an inner aggregator (as Flower's DP strategies wrap a
strategy) and add Gaussian noise calibrated to the sensitivity of what they combine.

- :class:`GlobalDP` — sample-level DP of the shared gradient (DP-FPL's "GDP"): one record moves its
  client's clipped gradient sum by at most C, so the group's aggregate by at most
  C·a_i / B_i (a_i the client's coefficient, B_i its expected batch); noise std σ_G·C·max_i a_i/B_i.
- :class:`ClientLevelDP` — client-level DP (DP-FedAvg's fixed denominator): each client's
  contribution is clipped to S, the clipped values are summed and divided by the *expected* number
  of contributions D (participation × the group's clients, a public constant), and N(0, σ_c²S²/D²)
  is added; one client (added or removed, with all its data) moves the result by at most S/D. A
  noisy result is released even for a group nobody contributed to.
- :class:`ReferenceServerNoise` — the published DP-FPL code's server noise (nominal ε only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pfpl.messages import Aggregator, Contributions, group_max, group_sum
from pfpl.streams import Draws


def _noise(shape, draws: Draws, device) -> torch.Tensor:
    return draws.normal(shape).to(device)


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


def expected_batch(sizes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Each client's expected batch ``min(b, n_i)``, from its training-set size."""
    return sizes.to(torch.float64).clamp(max=batch_size)


@dataclass
class GlobalDP:
    inner: Aggregator
    noise_multiplier: float
    clip: float
    batch_size: int

    def coefficients(self, c: Contributions) -> torch.Tensor:
        return self.inner.coefficients(c)

    def releases(self, c: Contributions) -> torch.Tensor:
        return self.inner.releases(c)

    def sensitivity(self, c: Contributions) -> torch.Tensor:
        """``[G]``: how far one record of any contributing client can move each group's result."""
        coef = self.coefficients(c).to(torch.float64)
        per_record = coef / expected_batch(c.sizes, self.batch_size).to(coef.device)
        return self.clip * group_max(per_record, c.groups.to(coef.device), c.n_groups)

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        out = self.inner(c, draws)
        if self.noise_multiplier == 0:
            return out
        std = self.noise_multiplier * self.sensitivity(c)
        return out + _noise(out.shape, draws, out.device) * _rows(std, out)


@dataclass
class ClientLevelDP:
    inner: Aggregator
    clip: float
    noise_multiplier: float = 0.0

    def _equal(self, c: Contributions) -> Contributions:
        return replace(c, sizes=torch.ones_like(c.sizes))

    def _denominator(self, c: Contributions) -> torch.Tensor:
        """``[G]``: the expected number of contributions per group (the realised count without one)."""
        if c.expected is not None:
            return c.expected.to(c.values.device, torch.float64).clamp(min=1e-12)
        ones = torch.ones(len(c.groups), device=c.values.device, dtype=torch.float64)
        return group_sum(ones, c.groups.to(c.values.device), c.n_groups).clamp(min=1)

    def _rescale(self, c: Contributions) -> torch.Tensor:
        """``[G]``: realised / expected contributions, turning the inner mean into sum / D."""
        ones = torch.ones(len(c.groups), device=c.values.device, dtype=torch.float64)
        return group_sum(ones, c.groups.to(c.values.device), c.n_groups) / self._denominator(c)

    def coefficients(self, c: Contributions) -> torch.Tensor:
        scale = self._rescale(c)[c.groups.to(c.values.device)]
        return (self.inner.coefficients(self._equal(c)).to(torch.float64) * scale).to(c.values.dtype)

    def releases(self, c: Contributions) -> torch.Tensor:
        if self.noise_multiplier > 0:
            return torch.ones(c.n_groups, dtype=torch.bool, device=c.values.device)
        return self.inner.releases(c)

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        norms = c.values.flatten(1).norm(dim=-1)
        clipped = c.values * _rows((self.clip / norms.clamp(min=1e-12)).clamp(max=1.0), c.values)
        out = self.inner(self._equal(c.with_values(clipped)), draws) * _rows(self._rescale(c), c.values)
        if self.noise_multiplier == 0:
            return out
        std = self.noise_multiplier * self.clip / self._denominator(c)
        return out + _noise(out.shape, draws, out.device) * _rows(std, out)


@dataclass
class ReferenceServerNoise:
    """std = max_i(σ·C/B_i) / (clients in the group), added to the group's aggregate."""

    inner: Aggregator
    noise_multiplier: float
    clip: float
    batch_size: int

    def coefficients(self, c: Contributions) -> torch.Tensor:
        return self.inner.coefficients(c)

    def releases(self, c: Contributions) -> torch.Tensor:
        return self.inner.releases(c)

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        out = self.inner(c, draws)
        per_client = self.noise_multiplier * self.clip / expected_batch(c.sizes, self.batch_size)
        groups = c.groups.to(per_client.device)
        counts = group_sum(torch.ones_like(per_client), groups, c.n_groups)
        std = group_max(per_client, groups, c.n_groups) / counts.clamp(min=1)
        return out + _noise(out.shape, draws, out.device) * _rows(std, out)
