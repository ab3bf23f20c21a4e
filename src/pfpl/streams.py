"""Named, per-client random streams (DESIGN §4).

Every random draw in a run comes from a generator keyed by ``(seed, purpose, round, step,
client, index)``. A client can therefore reproduce its own draws without the others (a Flower
node holding one client draws exactly what the simulator drew for it), any subset of clients
trains the same as the whole, and a checkpoint needs no generator state: a resumed run redraws
what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np
import torch

#: the ``client`` of draws that belong to the server (participants, server-side noise)
SERVER = -1


class Purpose(IntEnum):
    """What a draw is for; each purpose is an independent stream."""

    INIT_SHARED = 1  # the shared (group) parameters' initial value, drawn by the server
    INIT_LOCAL = 2  # a client's local parameters' initial value
    PARTICIPANTS = 3  # which clients take part in a round
    BATCH_ORDER = 4  # a client's permutation of its records (shuffle sampling)
    POISSON = 5  # a client's Poisson sample of its records for one step
    FACTORIZATION = 6  # DP-FPL's random power-iteration start for one step
    SAMPLE_NOISE = 7  # a client's sample-level DP noise for one step
    SERVER_NOISE = 8  # noise the server adds to an aggregate (global / client-level DP)
    RELEASE = 9  # the factorization drawn when a client's prompt is released and evaluated
    DROPOUT = 10  # whether a client drops out of a round (secure-aggregation experiments)
    PROTOCOL = 11  # keys, masks and shares of the secure protocols
    CLUSTERING = 12  # projections and initial centres of secure clustering


def seed_of(seed: int, purpose: Purpose, round: int = 0, step: int = 0, client: int = SERVER, index: int = 0) -> int:
    """A 63-bit seed that is a pure function of the key."""
    key = [int(seed), int(purpose), int(round), int(step), int(client) + 1, int(index)]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] % (2**63))


def stream(
    seed: int, purpose: Purpose, round: int = 0, step: int = 0, client: int = SERVER, index: int = 0
) -> torch.Generator:
    """A fresh CPU generator for one key (draw on the CPU, then move: results do not depend on the device)."""
    return torch.Generator().manual_seed(seed_of(seed, purpose, round, step, client, index))


def client_streams(
    seed: int, purpose: Purpose, clients: Sequence[int] | torch.Tensor, round: int = 0, step: int = 0, index: int = 0
) -> list[torch.Generator]:
    """One generator per client, for a vectorized draw that any single client can reproduce."""
    ids = clients.tolist() if isinstance(clients, torch.Tensor) else list(clients)
    return [stream(seed, purpose, round, step, int(c), index) for c in ids]


def randn_rows(
    gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """``[len(gens), *shape]`` standard normal draws, row ``i`` from ``gens[i]``."""
    if not gens:
        return torch.zeros(0, *shape, dtype=dtype, device=device)
    rows = [torch.randn(*shape, generator=g, dtype=dtype) for g in gens]
    return torch.stack(rows).to(device)
