"""Named random streams (DESIGN §4) and whose secret each one is (DESIGN §5, "Who learns what").

Every random draw of a run is keyed by ``(purpose, round, step, client, index)``. What the key is
combined with depends on who may know the draw:

- **public draws** — initial values, DP-FPL's power-iteration start, the released factorization,
  simulated dropouts, the secure protocols' public graphs and projections — come from
  :func:`stream`, a generator seeded by the run's config seed. Anyone can redraw them, and nothing
  private depends on their being unknown. A client draws the same alone (a Flower node) or with
  every other client at once, and a checkpoint needs no generator state.
- **mechanism draws** (:data:`MECHANISM`) — sample-level DP noise, Poisson and shuffle batch
  draws, the server's DP noise, client sampling, distributed-DP noise shares — are private only if
  the party they protect against cannot redraw them. They come from a party's :class:`Streams`:
  in ``secret`` mode (the default of private runs, as Opacus's ``secure_mode``) from ChaCha20
  (randomgen's ``ChaCha``, 20 rounds) keyed by HKDF-SHA256 of a 32-byte secret drawn from OS
  entropy that never leaves the party; in ``seeded`` mode (an experiment setting for reproducible
  studies, and every non-private run) from the config seed, exactly as public draws — reproducible,
  and therefore no formal guarantee against anyone who holds the config.

A party's secret is part of its state (the simulator's checkpoint, a Flower node's
``context.state`` and snapshot): a resumed run redraws exactly what the uninterrupted run drew,
and a checkpoint of a private run is secret material.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Protocol

import numpy as np
import torch

#: the ``client`` of draws that belong to the server (participants, server-side noise)
SERVER = -1
SECRET_BYTES = 32
RANDOMNESS_MODES = ("secret", "seeded")


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
    PROTOCOL = 11  # the secure protocols' public choices (the SecAgg+ graph)
    CLUSTERING = 12  # projections and initial centres of secure clustering
    DP_SHARE = 13  # a client's share of the distributed-DP noise under secure aggregation
    EXPERTS = 14  # pFedMoAP's random choice of the experts a client downloads


#: draws of a privacy mechanism: secret from every party the mechanism protects against
MECHANISM: frozenset[Purpose] = frozenset(
    {Purpose.PARTICIPANTS, Purpose.BATCH_ORDER, Purpose.POISSON, Purpose.SAMPLE_NOISE, Purpose.SERVER_NOISE}
    | {Purpose.DP_SHARE}
)


def seed_of(seed: int, purpose: Purpose, round: int = 0, step: int = 0, client: int = SERVER, index: int = 0) -> int:
    """A 63-bit seed that is a pure function of the key."""
    key = [int(seed), int(purpose), int(round), int(step), int(client) + 1, int(index)]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] % (2**63))


def stream(
    seed: int, purpose: Purpose, round: int = 0, step: int = 0, client: int = SERVER, index: int = 0
) -> torch.Generator:
    """A fresh CPU generator for one key of a *public* draw (draw on the CPU, then move: results do
    not depend on the device). Mechanism draws go through a party's :class:`Streams`."""
    return torch.Generator().manual_seed(seed_of(seed, purpose, round, step, client, index))


def client_streams(
    seed: int, purpose: Purpose, clients: Sequence[int] | torch.Tensor, round: int = 0, step: int = 0, index: int = 0
) -> list[torch.Generator]:
    """One public generator per client, for a vectorized draw that any single client can reproduce."""
    return [stream(seed, purpose, round, step, int(c), index) for c in _ids(clients)]


def randn_rows(
    gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """``[len(gens), *shape]`` standard normal draws, row ``i`` from the public generator ``gens[i]``."""
    if not gens:
        return torch.zeros(0, *shape, dtype=dtype, device=device)
    rows = [torch.randn(*shape, generator=g, dtype=dtype) for g in gens]
    return torch.stack(rows).to(device)


# ---- mechanism draws ------------------------------------------------------------------------------
class Draws(Protocol):
    """One key's draws of a privacy mechanism (CPU tensors; callers move them)."""

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal, float32."""
        ...

    def uniform(self, n: int) -> torch.Tensor:
        """Uniform on [0, 1)."""
        ...

    def permutation(self, n: int) -> torch.Tensor:
        """A uniform permutation of ``range(n)`` (int64)."""
        ...

    def poisson(self, lam: float, shape: Sequence[int]) -> torch.Tensor:
        """Poisson(λ) counts, float64."""
        ...


class SeededDraws:
    """Draws from the config seed (torch's generator): reproducible by anyone who holds the config."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def normal(self, shape):
        return torch.randn(*shape, generator=self.gen)

    def uniform(self, n):
        return torch.rand(n, generator=self.gen)

    def permutation(self, n):
        return torch.randperm(n, generator=self.gen)

    def poisson(self, lam, shape):
        return torch.poisson(torch.full(tuple(shape), float(lam), dtype=torch.float64), generator=self.gen)


class SecretDraws:
    """Draws from ChaCha20 keyed by a secret (a CSPRNG: without the key its output is unpredictable).

    Normal draws are the sum of four standard normals halved, as Opacus's ``secure_mode`` does, which
    blunts the floating-point attacks on a single sampled normal (Holohan & Braghin 2021)."""

    def __init__(self, key: bytes):
        from randomgen import ChaCha

        self.gen = np.random.Generator(ChaCha(key=int.from_bytes(key, "little"), counter=0, rounds=20))

    def normal(self, shape):
        shape = tuple(int(s) for s in shape)
        total = sum(self.gen.standard_normal(shape) for _ in range(4))
        return torch.from_numpy(np.asarray(total / 2.0, dtype=np.float32))

    def uniform(self, n):
        return torch.from_numpy(self.gen.random(int(n)))

    def permutation(self, n):
        return torch.from_numpy(self.gen.permutation(int(n)).astype(np.int64))

    def poisson(self, lam, shape):
        return torch.from_numpy(self.gen.poisson(float(lam), tuple(int(s) for s in shape)).astype(np.float64))


def entropy(n: int) -> bytes:
    """``n`` bytes of OS entropy: where every secret comes from (one place, so a test can fix it)."""
    return os.urandom(n)


def _derive(secret: bytes, purpose: Purpose, round: int, step: int, client: int, index: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = b"pfpl-stream/v1" + struct.pack(">qqqqq", int(purpose), int(round), int(step), int(client), int(index))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _ids(clients: Iterable[int] | torch.Tensor) -> list[int]:
    return [int(c) for c in (clients.tolist() if isinstance(clients, torch.Tensor) else clients)]


class Streams:
    """The mechanism draws of one or more parties (clients, or the server as :data:`SERVER`).

    ``secrets`` maps each party this object may draw for to its 32-byte secret (``secret`` mode), or
    is None (``seeded`` mode: draws from ``seed``). A draw for a party whose secret is not held is
    refused: a node holds only its own clients' secrets, the server only its own."""

    def __init__(self, seed: int, secrets: dict[int, bytes] | None = None):
        self.seed = int(seed)
        self.secrets = None if secrets is None else {int(k): bytes(v) for k, v in secrets.items()}
        for party, secret in (self.secrets or {}).items():
            if len(secret) != SECRET_BYTES:
                raise ValueError(f"the secret of party {party} must be {SECRET_BYTES} bytes")

    @classmethod
    def create(cls, seed: int, parties: Iterable[int], secret: bool) -> Streams:
        """Fresh streams for ``parties``: secrets from OS entropy (``secret``), or the seed."""
        if not secret:
            return cls(seed)
        return cls(seed, {int(p): entropy(SECRET_BYTES) for p in parties})

    @property
    def mode(self) -> str:
        return "seeded" if self.secrets is None else "secret"

    def draws(self, purpose: Purpose, round: int = 0, step: int = 0, client: int = SERVER, index: int = 0) -> Draws:
        if purpose not in MECHANISM:
            raise ValueError(f"{purpose.name} is a public draw: use pfpl.streams.stream")
        if self.secrets is None:
            return SeededDraws(stream(self.seed, purpose, round, step, client, index))
        if int(client) not in self.secrets:
            raise KeyError(f"no secret for party {client}: a party draws only its own mechanism noise")
        return SecretDraws(_derive(self.secrets[int(client)], purpose, round, step, client, index))

    def rows(
        self, purpose: Purpose, clients: Sequence[int] | torch.Tensor, round: int = 0, step: int = 0, index: int = 0
    ) -> list[Draws]:
        """One key's draws per client, in the order of ``clients``."""
        return [self.draws(purpose, round, step, c, index) for c in _ids(clients)]

    def subset(self, parties: Iterable[int]) -> Streams:
        """The streams of some of the parties (what one node of a deployment holds)."""
        if self.secrets is None:
            return Streams(self.seed)
        return Streams(self.seed, {int(p): self.secrets[int(p)] for p in parties})

    # ---- state (secret material: it lets whoever holds it regenerate the party's noise) ----------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "secrets": None if self.secrets is None else dict(self.secrets)}

    def load_state_dict(self, state: dict) -> None:
        """Restore in place (objects holding a reference keep drawing from the restored secrets)."""
        restored = Streams(state["seed"], state.get("secrets"))
        self.seed, self.secrets = restored.seed, restored.secrets


def normal_rows(draws: Sequence[Draws], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[len(draws), *shape]`` standard normal mechanism draws, row ``i`` from ``draws[i]``."""
    if not draws:
        return torch.zeros(0, *shape, device=device)
    return torch.stack([d.normal(shape) for d in draws]).to(device)
