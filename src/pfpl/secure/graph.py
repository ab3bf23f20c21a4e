"""SecAgg+'s sparse communication graph (Bell et al. 2020): every client masks with, and shares
its secrets among, only k neighbours, so a round costs O(n·k) instead of O(n²). pfpl uses a
k-regular Harary graph over a public random permutation of the participants (each client is
joined to the k/2 next and k/2 previous ones on a cycle); k ≥ n − 1 is the full graph of the
original SecAgg."""

from __future__ import annotations

import math

import numpy as np

from pfpl.errors import ConfigError


def default_degree(n: int) -> int:
    """An even degree of about 2·log2(n) + 2 (the O(log n) neighbourhood of SecAgg+), at most n − 1."""
    k = 2 * math.ceil(math.log2(max(n, 2))) + 2
    return min(n - 1, k + (k % 2))


def neighbours(clients: list[int], degree: int | None, seed: int) -> dict[int, list[int]]:
    """``{client: sorted neighbours}`` of a symmetric graph; ``degree=None`` or ≥ n − 1: everyone.
    A sparse degree must be even and at least 2 (the Harary graph joins k/2 on each side; an odd
    degree used to be rounded down silently, so the neighbourhoods were smaller than configured)."""
    n = len(clients)
    if degree is None or degree >= n - 1:
        return {c: sorted(x for x in clients if x != c) for c in clients}
    if degree < 2 or degree % 2:
        raise ConfigError(
            f"secure.degree = {degree} for {n} clients: a sparse graph needs an even degree of at least 2 "
            f"(or at least {n - 1}, the full graph)"
        )
    half = degree // 2
    order = [clients[i] for i in np.random.default_rng(seed).permutation(n)]
    out: dict[int, set[int]] = {c: set() for c in clients}
    for pos, c in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            if other != c:
                out[c].add(other)
                out[other].add(c)
    return {c: sorted(v) for c, v in out.items()}
