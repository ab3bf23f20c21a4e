"""Each client's training records and the batches it draws from them (DESIGN §4).

Batch draws come from the client's own mechanism streams (:class:`~pfpl.streams.Streams`: secret
in a private run, since knowing which records a batch holds voids the amplification by subsampling
the accountant claims), so a client draws the same batches whether it trains alone (a Flower node,
the reference compute pattern) or with every other client at once (the vectorized simulator, which
pads the clients' batches to one width and masks the padding).

Sampling modes:

- ``shuffle``: every round the client walks fresh permutations of its records in batches of
  ``b' = min(b, n)``; a permutation gives ``⌊n / b'⌋`` whole batches (the last ``n mod b'`` records
  of it are left out) and the next step starts a new permutation, so no batch holds a record
  twice and a record appears in at most :func:`appearances_per_round` batches of a round;
- ``poisson``: every step takes each record independently with probability ``min(b, n) / n``
  (the sampling DP-SGD's amplification-by-subsampling analysis assumes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pfpl.data.features import Features
from pfpl.streams import Purpose, Streams

SAMPLING_MODES = ("shuffle", "poisson")


@dataclass
class Batch:
    """One step's records for B clients: features ``[B, b, E]``, labels ``[B, b]``, mask ``[B, b]``, and
    where the run prompts the image tower the cached prompt-free part of its input ``[B, b, T, W]``."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor | None = None

    def rows(self, i: int, j: int) -> Batch:
        tokens = self.tokens[i:j] if self.tokens is not None else None
        return Batch(self.x[i:j], self.y[i:j], self.mask[i:j], tokens)


def expected_batch(size: int, batch_size: int) -> int:
    """A client's expected batch size ``min(b, n)``; its Poisson rate is that over ``n``."""
    return min(batch_size, size)


def appearances_per_round(size: int, steps: int, batch_size: int) -> int:
    """The most batches one record can appear in during a round of ``steps`` shuffle steps: one per
    permutation, and a permutation serves ``⌊n / b'⌋`` steps."""
    per_permutation = size // expected_batch(size, batch_size)
    return math.ceil(steps / per_permutation)


def client_batches(
    size: int, steps: int, batch_size: int, sampling: str, streams: Streams, round: int, client: int
) -> list[torch.Tensor]:
    """Positions (into the client's own records) of each step's batch, from the client's streams."""
    b = expected_batch(size, batch_size)
    if sampling == "poisson":
        rate = b / size
        return [
            torch.nonzero(streams.draws(Purpose.POISSON, round, s, client).uniform(size) < rate).flatten()
            for s in range(steps)
        ]
    if sampling != "shuffle":
        raise ValueError(f"sampling {sampling!r}: allowed {', '.join(SAMPLING_MODES)}")
    draws = streams.draws(Purpose.BATCH_ORDER, round, 0, client)
    per_permutation = size // b
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = draws.permutation(size)
        out += [order[k * b : (k + 1) * b] for k in range(min(per_permutation, steps - len(out)))]
    return out


class ClientData:
    """Per-client index arrays into one table of cached image features, on the engine's device; with
    ``tokens`` (``[N, T, W]``, :mod:`pfpl.backbones.vision_tower`) every batch carries its records' too."""

    def __init__(
        self,
        features: Features,
        clients: Sequence[np.ndarray],
        device: torch.device | str = "cpu",
        tokens: torch.Tensor | None = None,
    ):
        self.device = torch.device(device)
        self.tokens = tokens.to(self.device) if tokens is not None else None
        self.features = features.features.to(self.device)
        self.labels = features.labels.to(self.device)
        self.clients = [torch.as_tensor(np.asarray(ix), dtype=torch.long) for ix in clients]
        if any(len(ix) == 0 for ix in self.clients):
            raise ValueError("every client needs at least one training record")

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def sizes(self) -> list[int]:
        return [len(ix) for ix in self.clients]

    def held_classes(self, n_classes: int) -> torch.Tensor:
        """``[N, C]`` booleans: which classes each client's records hold (the client's own knowledge)."""
        out = torch.zeros(self.n_clients, n_classes, dtype=torch.bool)
        for c, ix in enumerate(self.clients):
            out[c, self.labels[ix.to(self.device)].cpu()] = True
        return out

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[n, E]`` and labels ``[n]`` of records ``index`` (rows of the table)."""
        index = index.to(self.device)
        return self.features[index], self.labels[index]

    def batches(
        self,
        clients: torch.Tensor,
        steps: int,
        batch_size: int,
        sampling: str,
        streams: Streams,
        round: int,
        only: range | None = None,
    ) -> list[Batch]:
        """Every step's batch for ``clients`` (or the steps in ``only``: a node answering one exchange of
        a round gathers just those), padded to one width per step and masked; ``streams`` holds the
        clients' batch draws."""
        ids = clients.tolist()
        positions = [client_batches(len(self.clients[c]), steps, batch_size, sampling, streams, round, c) for c in ids]
        out = []
        for s in only if only is not None else range(steps):
            takes = [self.clients[c][positions[i][s]] for i, c in enumerate(ids)]
            width = batch_size if sampling == "shuffle" else max([1] + [len(t) for t in takes])
            xs, ys, ms, ts = [], [], [], []
            for t in takes:
                x, y = self.load(t)
                pad = width - len(t)
                xs.append(F.pad(x, (0, 0, 0, pad)))
                ys.append(F.pad(y, (0, pad)))
                ms.append(torch.cat([torch.ones(len(t)), torch.zeros(pad)]).to(self.device))
                if self.tokens is not None:
                    ts.append(F.pad(self.tokens[t.to(self.device)], (0, 0, 0, 0, 0, pad)))
            if not ids:
                out.append(Batch(self.features[:0, None], self.labels[:0, None], torch.zeros(0, 1, device=self.device)))
            else:
                tokens = torch.stack(ts) if ts else None
                out.append(Batch(torch.stack(xs), torch.stack(ys), torch.stack(ms), tokens))
        return out


class ImageClientData(ClientData):
    """Raw images instead of cached features: the image tower runs on every batch (the published
    code's compute pattern, which ``pfpl bench`` times against the engine)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, clients: Sequence[np.ndarray], encoder):
        self.encoder = encoder
        self.images = images
        dummy = Features(torch.zeros(len(labels), 1), labels, torch.zeros(len(labels), dtype=torch.long))
        super().__init__(dummy, clients, images.device)

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.device)
        return self.encoder.encode_images(self.images[index]), self.labels[index]
