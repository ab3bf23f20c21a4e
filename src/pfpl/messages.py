"""The messages clients and the server exchange (DESIGN §4), as plain typed records.

The simulator passes them in memory for B clients at once; a one-client deployment (a Flower
node) carries the same fields for B = 1. Everything that combines clients' messages at the
server — the weighted mean, client-level or global DP, secure summation — is an
:class:`Aggregator`, and wrappers compose by holding an inner aggregator (as Flower's DP
strategies wrap a strategy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from pfpl.streams import Draws

#: the phases of a secure-aggregation exchange a client can drop out before (1 advertise keys, 2 share
#: keys, 3 masked input, 4 unmasking): the protocol's, and what a simulated dropout draws from
PHASES = ("advertise", "share", "masked", "unmask")


@dataclass
class Upload:
    """What B clients send after a client update: one tensor per shared parameter.

    ``values[name]`` is the gradient of the shared parameter (``step`` sync) or the change of the
    client's copy over its local steps (``fedavg`` sync), ``[B, ...]``; ``sizes`` are the clients'
    training-set sizes (aggregation weights); ``loss`` is the clients' training loss, a diagnostic
    that stays on the client in private runs.
    """

    clients: torch.Tensor  # [B] client ids
    values: dict[str, torch.Tensor]
    sizes: torch.Tensor  # [B]
    loss: torch.Tensor  # [B]
    # anything else a method chooses to send (FedSP's explicitly named ``reference`` upload of its body);
    # the server averages it for itself and never sends it back
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[Upload]) -> Upload:
        names = list(parts[0].values)
        extras = list(parts[0].extras)
        return Upload(
            torch.cat([p.clients for p in parts]),
            {n: torch.cat([p.values[n] for p in parts]) for n in names},
            torch.cat([p.sizes for p in parts]),
            torch.cat([p.loss for p in parts]),
            {n: torch.cat([p.extras[n] for p in parts]) for n in extras},
        )


@dataclass
class Contributions:
    """The clients' values of one shared tensor, as the server's aggregation sees them."""

    values: torch.Tensor  # [B, ...]
    sizes: torch.Tensor  # [B] training-set sizes
    clients: torch.Tensor  # [B] client ids
    groups: torch.Tensor  # [B] the group each client's value belongs to
    n_groups: int
    expected: torch.Tensor | None = None  # [G] expected contributions per group (participation × members)
    # which exchange this is (round, step, shared parameter): keys the clients' own protocol streams
    round: int = 0
    step: int = 0
    index: int = 0
    # clients that dropped out of this exchange: client -> (phase, group). Those that dropped before
    # delivering are not among ``values``; those that dropped while unmasking are (their input counts)
    drops: dict[int, tuple[str, int]] | None = None

    def with_values(self, values: torch.Tensor) -> Contributions:
        return replace(self, values=values)


class Aggregator(Protocol):
    """Combines contributions into one value per group, ``[G, ...]``."""

    def coefficients(self, c: Contributions) -> torch.Tensor:
        """Each contribution's coefficient in its group's result ``[B]`` (what DP sensitivities use)."""
        ...

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        """``draws``: the server's mechanism draws for this aggregation (its DP noise)."""
        ...

    def releases(self, c: Contributions) -> torch.Tensor:
        """``[G]`` booleans: which groups' results the server must apply (a noisy aggregator releases
        noise even for a group nobody contributed to)."""
        ...


def group_sum(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[G, ...]`` sums of ``values`` ``[B, ...]`` by group."""
    out = torch.zeros(n_groups, *values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add_(0, groups.to(values.device), values)


def group_max(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[G]`` maxima of ``values`` ``[B]`` by group (0 for an empty group)."""
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, groups.to(values.device), values, reduce="amax", include_self=True)


def weighted_sum(values: torch.Tensor, coefficients: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    scaled = values * coefficients.to(values.device, values.dtype).view(-1, *[1] * (values.dim() - 1))
    return group_sum(scaled, groups, n_groups)


class WeightedMean:
    """Each group's mean weighted by training-set size (FedAvg's weighting)."""

    def coefficients(self, c: Contributions) -> torch.Tensor:
        sizes = c.sizes.to(c.values.device, torch.float64)
        groups = c.groups.to(c.values.device)
        return (sizes / group_sum(sizes, groups, c.n_groups)[groups]).to(c.values.dtype)

    def __call__(self, c: Contributions, draws: Draws) -> torch.Tensor:
        return weighted_sum(c.values, self.coefficients(c), c.groups, c.n_groups)

    def releases(self, c: Contributions) -> torch.Tensor:
        return contributed(c)


def contributed(c: Contributions) -> torch.Tensor:
    """``[G]``: groups with at least one contribution."""
    ones = torch.ones(len(c.groups), device=c.values.device)
    return group_sum(ones, c.groups.to(c.values.device), c.n_groups) > 0
