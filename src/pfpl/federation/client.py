"""The client update (DESIGN §4): the one training loop, for B ≥ 1 clients at once.

It takes the shared parameters the clients received, their local state (local parameters and
optimizer rows), their batches and their mechanism streams (their DP noise: secret in a private
run), and draws every other random number from the clients' public streams; it returns what they
upload. The vectorized simulator calls it for all participants together, a
one-client deployment (a Flower node, the reference compute pattern of ``pfpl bench``) for one
client; both get the same result. Privacy is the :class:`~pfpl.privacy.mechanisms.GradientMechanism`
it is built with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pfpl.algorithms.base import Method
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import Batch
from pfpl.errors import BackboneError
from pfpl.messages import Upload
from pfpl.privacy.mechanisms import BatchMean, GradientMechanism, StepLoss
from pfpl.streams import Purpose, Streams, client_streams

SYNC_MODES = ("step", "fedavg")


@dataclass
class TrainSettings:
    rounds: int = 10
    local_steps: int = 0  # 0: one local epoch of the median client
    batch_size: int = 32
    sync: str = "step"  # "step": shared gradients averaged every step; "fedavg": E local steps, then average
    participation: float = 1.0
    client_sampling: str = "fixed"  # "fixed": round(p·N) clients per round; "poisson": each with probability p
    dropout: float = 0.0  # probability a participant drops out of an exchange (see Server.deliver)
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True
    seed: int = 0
    sampling: str = "shuffle"  # "shuffle" or "poisson" (see pfpl.data.clients)
    train_shared: bool = True  # False: shared parameters stay fixed (audit shadows on a released prompt)
    private: bool = False  # a private run (pfpl.privacy.modes.is_private): the loss never leaves a client

    def lr_at(self, round_index: int) -> float:
        if not self.cosine:
            return self.lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * round_index / self.rounds))


def steps_per_round(sizes: list[int], settings: TrainSettings) -> int:
    """``local_steps``, or one local epoch of the median client when it is 0."""
    return settings.local_steps or max(1, math.ceil(float(np.median(sizes)) / settings.batch_size))


@dataclass
class ClientState:
    """B clients' private state: local parameters and SGD-momentum rows, ``[B, ...]`` each.

    ``momentum`` holds a row per local parameter and, in ``fedavg`` sync, one per shared parameter
    (``"<name>@copy"``, the client's own optimizer state for its copy of the shared prompt)."""

    clients: torch.Tensor
    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, i: int, j: int) -> ClientState:
        return ClientState(
            self.clients[i:j],
            {k: v[i:j].clone() for k, v in self.params.items()},
            {k: v[i:j].clone() for k, v in self.momentum.items()},
        )

    def write_rows(self, i: int, part: ClientState) -> None:
        j = i + len(part.clients)
        for k, v in part.params.items():
            self.params[k][i:j] = v
        for k, v in part.momentum.items():
            if k not in self.momentum:
                self.momentum[k] = torch.zeros(len(self.clients), *v.shape[1:], dtype=v.dtype, device=v.device)
            self.momentum[k][i:j] = v


def sgd_step(
    param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, beta: float, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD with momentum and weight decay (PyTorch's formulation): returns (param, momentum)."""
    buf = beta * momentum + grad + weight_decay * param
    return param - lr * buf, buf


def copy_name(name: str) -> str:
    return f"{name}@copy"


class ClientUpdate:
    """Local steps of B clients with their own optimizer state; returns their upload."""

    def __init__(
        self,
        method: Method,
        tower: PromptTower,
        settings: TrainSettings,
        scale: float,
        reference: torch.Tensor | None = None,
        mechanism: GradientMechanism | None = None,
    ):
        self.method, self.tower, self.s, self.scale = method, tower, settings, scale
        self.reference = reference  # hand-crafted prompt text features [C, E] (FedPGP)
        self.mechanism = mechanism or BatchMean()
        if method.prompts_vision and tower.vision is None:
            raise BackboneError(
                f"{method.name} prompts the image tower, but its prompt tower carries no prompted image tower "
                "(the run's Benchmark builds one when a method of the config prompts the image tower)"
            )
        method.prepare(tower)

    def gradients(
        self,
        params: dict[str, torch.Tensor],
        clients: torch.Tensor,
        batch: Batch,
        normaliser: torch.Tensor,
        round_index: int,
        step: int,
        streams: Streams,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients of the persistent parameters and the per-client loss for one batch."""
        seed = self.s.seed
        views = self.method.views(params, client_streams(seed, Purpose.FACTORIZATION, clients, round_index, step))
        text = self.method.text_features(self.tower, views)
        extra = self.method.extra_loss(views, text, self.tower, self.reference)
        noise = streams.rows(Purpose.SAMPLE_NOISE, clients, round_index, step)
        head = self.method.head(views, text, batch)  # None: the logits are scale · x · T
        step_loss = StepLoss(views.leaves, text, batch, self.scale, extra, views.vision, self.tower.vision, head)
        leaf_grads, loss = self.mechanism(step_loss, normaliser, noise)
        return self.method.param_grads(views, leaf_grads), loss

    def __call__(
        self,
        shared: dict[str, torch.Tensor],
        state: ClientState,
        batches: list[Batch],
        sizes: torch.Tensor,
        round_index: int,
        first_step: int,
        streams: Streams,
    ) -> Upload:
        """``shared``: the shared parameters each client received ``[B, ...]``; ``state`` is updated in
        place; ``batches``: one per local step and stage (one in ``step`` sync, where each step is an
        exchange); ``streams``: the clients' mechanism draws. A method with several stages (FedSP)
        trains a different part in each, on its own share of the batches."""
        s = self.s
        lr = s.lr_at(round_index)
        fedavg = s.sync == "fedavg"
        normaliser = sizes.to(torch.float32).clamp(max=s.batch_size)
        copies = {n: v.clone() for n, v in shared.items()}
        self.method.begin_round(state.params)
        grads: dict[str, torch.Tensor] = {}
        losses = []
        stages = self.method.stages()
        per_stage = max(1, len(batches) // len(stages))
        idle = all(stage.trainable == () for stage in stages)  # a control that trains nothing (FedSP's server alone)
        for k, batch in enumerate(batches):
            trains = stages[min(k // per_stage, len(stages) - 1)].trainable
            if idle:
                continue
            grads, loss = self.gradients(
                {**copies, **state.params}, state.clients, batch, normaliser, round_index, first_step + k, streams
            )
            losses.append(loss)
            with torch.no_grad():
                for name in self.method.trainable_local:
                    if trains is None or name in trains:
                        self._sgd(state.params, state.momentum, name, name, grads[name], lr)
                if fedavg and s.train_shared:
                    for name in copies:
                        if trains is None or name in trains:
                            self._sgd(copies, state.momentum, name, copy_name(name), grads[name], lr)
        with torch.no_grad():
            if fedavg:
                values = {n: copies[n] - shared[n] for n in shared}
            else:
                values = {n: grads[n].detach() if n in grads else torch.zeros_like(shared[n]) for n in shared}
        extras = self.method.upload_extras(state.params)
        loss = torch.stack(losses).mean(0) if losses else sizes * 0
        if s.private:  # a diagnostic no mechanism covers (client-level DP's mechanism is not the client's)
            loss = torch.full_like(loss, float("nan"))
        return Upload(state.clients, values, sizes, loss, extras)

    def _sgd(self, params, momentum, name, buf_name, grad, lr) -> None:
        if buf_name not in momentum:
            momentum[buf_name] = torch.zeros_like(params[name])
        params[name], momentum[buf_name] = sgd_step(
            params[name], momentum[buf_name], grad, lr, self.s.momentum, self.s.weight_decay
        )
