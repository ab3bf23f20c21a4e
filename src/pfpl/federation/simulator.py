"""The in-process simulator engine (DESIGN §4).

All participating clients train together: prompt parameters carry a leading client dimension, one
text-tower call serves every client (``[clients × classes, L, D]``, chunked by the tower), and each
client keeps its own SGD-momentum state. Randomness is a pure function of (seed, round, client), so
a run resumed from the checkpoint of round r continues exactly as the uninterrupted run would.

Hook points for privacy: :attr:`Simulator.gradients` computes the per-client gradients of the
method's leaves (DP replaces it with clipped, noised per-sample sums), and
:attr:`Simulator.aggregate` combines the clients' global gradients or updates (global / client-level
DP adds its noise there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pfpl.algorithms.base import Method, Views
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.features import Features


@dataclass
class EngineSettings:
    rounds: int = 10
    local_steps: int = 0  # 0: one local epoch of the median client
    batch_size: int = 32
    sync: str = "step"  # "step": global gradient averaged every step; "fedavg": E local steps, then average
    participation: float = 1.0
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True
    seed: int = 0
    sampling: str = "shuffle"  # "shuffle": a permutation per round; "poisson": each record with prob b/n per step
    train_global: bool = True  # False: the global prompt stays fixed (e.g. audit shadows on a released global prompt)


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator().manual_seed(seed)


def steps_per_round(sizes: list[int], settings: EngineSettings) -> int:
    """``local_steps``, or one local epoch of the median client when it is 0."""
    return settings.local_steps or max(1, math.ceil(float(np.median(sizes)) / settings.batch_size))


class VectorSGD:
    """SGD with momentum and weight decay whose state has a leading client dimension, so only the
    participating clients' slices move (a shared optimizer would leak one client's momentum)."""

    def __init__(self, momentum: float, weight_decay: float):
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers: dict[str, torch.Tensor] = {}

    def step(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float, index: torch.Tensor | None = None) -> None:
        if name not in self.buffers:
            self.buffers[name] = torch.zeros_like(param)
        buf = self.buffers[name]
        p = param if index is None else param[index]
        b = buf if index is None else buf[index]
        d = grad + self.weight_decay * p
        b = self.momentum * b + d
        p = p - lr * b
        if index is None:
            buf.copy_(b)
            param.copy_(p)
        else:
            buf[index] = b
            param[index] = p

    def step_rows(self, name: str, values: torch.Tensor, grad: torch.Tensor, lr: float, rows: torch.Tensor,
                  n_rows: int) -> None:
        """Update ``values`` [B, ...] in place, with its state in rows ``rows`` of an ``[n_rows, ...]`` buffer."""
        if name not in self.buffers:
            self.buffers[name] = torch.zeros(n_rows, *values.shape[1:], dtype=values.dtype)
        buf = self.buffers[name]
        b = self.momentum * buf[rows] + grad + self.weight_decay * values
        buf[rows] = b
        values -= lr * b


def batch_gradients(sim: "Simulator", views: Views, text: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    mask: torch.Tensor, active: torch.Tensor | None = None,
                    gen: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Non-private gradients: each client's mean cross-entropy over its batch, one backward pass.

    Clients' parameters are disjoint slices, so the summed loss gives every client exactly its own
    gradient. Returns the leaves' gradients and the per-client losses.
    """
    logits = sim.scale * torch.einsum("bne,bce->bnc", x, text)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    per_client = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    total = per_client.sum()
    extra = sim.method.extra_loss(views, text, sim.tower, sim.reference)
    if extra is not None:
        total = total + extra
    names = list(views.leaves)
    grads = torch.autograd.grad(total, [views.leaves[n] for n in names])
    return dict(zip(names, grads)), per_client.detach()


def mean_aggregate(values: torch.Tensor, weights: torch.Tensor, active: torch.Tensor | None = None,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Weighted mean over the client dimension."""
    w = weights / weights.sum()
    return torch.einsum("b,b...->...", w, values)


class Simulator:
    """Trains one method's prompts for all clients of a partition."""

    def __init__(self, method: Method, tower: PromptTower, train: Features, clients: list[np.ndarray],
                 settings: EngineSettings, scale: float, reference: torch.Tensor | None = None):
        self.method, self.tower, self.train, self.s = method, tower, train, settings
        self.clients = [torch.as_tensor(ix, dtype=torch.long) for ix in clients]
        self.n_clients = len(clients)
        self.scale = scale
        self.reference = reference  # hand-crafted prompt text features [C, E] (FedPGP)
        sizes = [len(ix) for ix in clients]
        self.sizes = torch.tensor(sizes, dtype=torch.float32)
        self.local_steps = steps_per_round(sizes, settings)
        gen = _generator(settings.seed, 7)
        self.params = method.init(self.n_clients, tower.n_ctx, tower.backbone.ctx_dim, gen)
        self.opt = VectorSGD(settings.momentum, settings.weight_decay)
        self.round = 0
        self.participations = torch.zeros(self.n_clients, dtype=torch.long)  # rounds each client took part in
        # privacy hook points: DP replaces these (pfpl.privacy.mechanisms.Privatizer)
        self.gradients: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]] = batch_gradients
        self.aggregate: Callable[..., torch.Tensor] = mean_aggregate

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"round": self.round, "params": {k: v.clone() for k, v in self.params.items()},
                "buffers": {k: v.clone() for k, v in self.opt.buffers.items()},
                "participations": self.participations.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.params = {k: v.clone() for k, v in state["params"].items()}
        self.opt.buffers = {k: v.clone() for k, v in state["buffers"].items()}
        self.participations = state["participations"].clone()

    # ---- one round ---------------------------------------------------------------------------
    def lr(self, round_index: int) -> float:
        if not self.s.cosine:
            return self.s.lr
        return 0.5 * self.s.lr * (1 + math.cos(math.pi * round_index / self.s.rounds))

    def participants(self, round_index: int) -> torch.Tensor:
        k = max(1, round(self.s.participation * self.n_clients))
        if k >= self.n_clients:
            return torch.arange(self.n_clients)
        gen = _generator(self.s.seed, 11, round_index)
        return torch.randperm(self.n_clients, generator=gen)[:k].sort().values

    def expected_batch(self) -> torch.Tensor:
        """Each client's expected batch size: ``min(b, n_i)`` (Poisson rate q_i = that / n_i)."""
        return torch.tensor([min(self.s.batch_size, len(ix)) for ix in self.clients], dtype=torch.float32)

    def batches(self, round_index: int, active: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per step: features [B, b, E], labels [B, b], mask [B, b]; each client walks a fresh
        permutation of its data every round (wrapping when a round is longer than an epoch), or,
        with Poisson sampling, takes each of its records independently with probability b/n_i."""
        if self.s.sampling == "poisson":
            return self._poisson_batches(round_index, active)
        b = self.s.batch_size
        orders = []
        for c in active.tolist():
            idx = self.clients[c]
            gen = _generator(self.s.seed, 13, round_index, c)
            need = self.local_steps * min(b, len(idx))
            reps = math.ceil(need / len(idx))
            orders.append(torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(reps)]))
        out = []
        for step in range(self.local_steps):
            xs, ys, ms = [], [], []
            for order, c in zip(orders, active.tolist()):
                size = min(b, len(self.clients[c]))
                take = order[step * size:(step + 1) * size]
                pad = b - len(take)
                xs.append(F.pad(self.train.features[take], (0, 0, 0, pad)))
                ys.append(F.pad(self.train.labels[take], (0, pad)))
                ms.append(torch.cat([torch.ones(len(take)), torch.zeros(pad)]))
            out.append((torch.stack(xs), torch.stack(ys), torch.stack(ms)))
        return out

    def _poisson_batches(self, round_index: int, active: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rates = self.expected_batch() / torch.tensor([len(ix) for ix in self.clients], dtype=torch.float32)
        out = []
        for step in range(self.local_steps):
            takes = []
            for c in active.tolist():
                gen = _generator(self.s.seed, 31, round_index, step, c)
                idx = self.clients[c]
                takes.append(idx[torch.rand(len(idx), generator=gen) < rates[c]])
            width = max(1, max(len(t) for t in takes))
            xs = torch.stack([F.pad(self.train.features[t], (0, 0, 0, width - len(t))) for t in takes])
            ys = torch.stack([F.pad(self.train.labels[t], (0, width - len(t))) for t in takes])
            ms = torch.stack([torch.cat([torch.ones(len(t)), torch.zeros(width - len(t))]) for t in takes])
            out.append((xs, ys, ms))
        return out

    def _slice(self, active: torch.Tensor, copies: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        b = len(active)
        sliced = {}
        for name in self.method.global_params:
            sliced[name] = copies[name] if copies is not None else self.params[name].expand(b, *self.params[name].shape)
        for name in self.method.local_params:
            sliced[name] = self.params[name][active]
        return sliced

    def run_round(self) -> dict[str, float]:
        """One round: every participant takes ``local_steps`` steps; the server syncs the global part."""
        r = self.round
        active = self.participants(r)
        lr = self.lr(r)
        fedavg = self.s.sync == "fedavg"
        weights = self.sizes[active]
        copies = None
        if fedavg and self.method.global_params:
            copies = {n: self.params[n].expand(len(active), *self.params[n].shape).clone() for n in self.method.global_params}
        losses = []
        for step, (x, y, mask) in enumerate(self.batches(r, active)):
            gen = _generator(self.s.seed, 17, r, step)
            views = self.method.views(self._slice(active, copies), gen)
            text = self.tower(views.ctx[:, None])
            leaf_grads, loss = self.gradients(self, views, text, x, y, mask, active, _generator(self.s.seed, 23, r, step))
            grads = self.method.param_grads(views, leaf_grads)
            losses.append(loss)
            with torch.no_grad():
                for name in self.method.local_params:
                    self.opt.step(name, self.params[name], grads[name], lr, active)
                for name in self.method.global_params if self.s.train_global else ():
                    if fedavg:  # each client's own optimizer state for its copy of the global prompt
                        self.opt.step_rows(f"{name}@client", copies[name], grads[name], lr, active, self.n_clients)
                    else:
                        mean = self.aggregate(grads[name], weights, active, _generator(self.s.seed, 29, r, step))
                        self.opt.step(name, self.params[name], mean, lr)
        if copies is not None and self.s.train_global:
            with torch.no_grad():
                for name in self.method.global_params:
                    update = copies[name] - self.params[name]
                    self.params[name] += self.aggregate(update, weights, active, _generator(self.s.seed, 37, r))
        self.participations[active] += 1
        self.round += 1
        return {"loss": float(torch.stack(losses).mean()), "lr": lr, "participants": len(active)}

    # ---- released prompts --------------------------------------------------------------------
    @torch.no_grad()
    def personalized_context(self) -> torch.Tensor:
        """Every client's released context ``[N, M, D]`` (random factorizations drawn from a fixed seed)."""
        everyone = torch.arange(self.n_clients)
        return self.method.context(self._slice(everyone, None), _generator(self.s.seed, 19))

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """Every client's class text features ``[N, C, E]``."""
        return self.tower(self.personalized_context()[:, None])
