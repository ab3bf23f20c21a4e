"""Sample-level gradient mechanisms: how a client turns one step's batch into the gradients of its
prompt leaves (DESIGN §5). The client update is built with one of them; nothing is patched.

- :class:`BatchMean` — no privacy: each client's mean cross-entropy, one backward pass.
- :class:`FeatureDP` — every prompt parameter reaches the loss only through the class text
  features T ``[C, E]``. Record n's gradient w.r.t. T is ``scale·(p_n − e_y) ⊗ x_n``, so its norm
  is known in closed form; each is clipped to C, summed, N(0, σ²C²) is added and the noisy sum is
  backpropagated through the text tower once. Everything after the noise is post-processing:
  sample-level DP of the whole released prompt at about the cost of a non-private step.
- :class:`PerSampleDP` — exact per-record gradients of the leaves (one forward, a vmapped backward
  over per-record cotangents). The private leaves (DP-FPL: u, v) are jointly clipped to C and
  noised on the client (the paper's "local DP"); the other leaves are clipped per record and left
  for the server's global DP.
- :class:`BatchClipReference` — the published DP-FPL code's batch clipping, for comparison only:
  its ε is nominal (no formal guarantee).

Each returns the leaves' gradients normalised by the clients' expected batch size, and the
clients' training loss — a diagnostic no mechanism covers, so the private mechanisms withhold it
(NaN): what a client sends in a private run is the mechanism's output and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pfpl.data.clients import Batch
from pfpl.streams import Draws, normal_rows


@dataclass
class StepLoss:
    """One step of B clients, as a gradient mechanism sees it."""

    leaves: dict[str, torch.Tensor]  # [B, ...], require grad
    text: torch.Tensor  # [B, C, E] normalised class text features, a function of the leaves
    batch: Batch
    scale: float  # CLIP's logit scale
    extra: torch.Tensor | None = None  # a data-independent regulariser of the leaves (FedPGP)

    def logits(self) -> torch.Tensor:
        return self.scale * torch.einsum("bne,bce->bnc", self.batch.x, self.text)


class GradientMechanism(Protocol):
    """A mechanism that backpropagates once per record (``per_record_backward = True``, as
    :class:`PerSampleDP`) keeps a batch of per-record graphs alive: the simulator sizes its
    client-update calls by that."""

    def __call__(
        self, step: StepLoss, normaliser: torch.Tensor, noise: Sequence[Draws]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(gradients of the leaves ``[B, ...]``, per-client loss ``[B]``, NaN where withheld);
        ``normaliser`` is each client's expected batch size, ``noise`` each client's own draws."""
        ...


def _grads(outputs, leaves: dict[str, torch.Tensor], cotangents=None, **kw) -> dict[str, torch.Tensor]:
    names = list(leaves)
    got = torch.autograd.grad(outputs, [leaves[n] for n in names], cotangents, allow_unused=True, **kw)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, got)}


def withheld(step: StepLoss) -> torch.Tensor:
    """The loss a private mechanism sends: none (NaN per client)."""
    return torch.full((step.batch.x.shape[0],), float("nan"), device=step.batch.x.device)


def _per_client(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Divide ``x`` [B, ...] by ``factor`` [B]."""
    return x / factor.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))


class BatchMean:
    """Non-private: each client's mean cross-entropy over its batch, one backward pass.

    Clients' parameters are disjoint slices, so the summed loss gives every client exactly its own
    gradient."""

    @classmethod
    def from_plan(cls, plan) -> BatchMean:
        return cls()

    def __call__(self, step, normaliser, noise):
        logits = step.logits()
        y, mask = step.batch.y, step.batch.mask
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        per_client = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
        total = per_client.sum() + (step.extra if step.extra is not None else 0)
        return _grads(total, step.leaves), per_client.detach()


def per_sample_text_grads(step: StepLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(err ``[B, n, C]``, per-record gradient norms ``[B, n]``, per-client mean loss ``[B]``).

    Record n's cross-entropy gradient w.r.t. T is ``scale · err_n ⊗ x_n`` with ``err = p − e_y``.
    """
    x, y, mask = step.batch.x, step.batch.y, step.batch.mask
    with torch.no_grad():
        logits = step.logits()
        err = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        err = err * mask[..., None]
        norms = step.scale * err.norm(dim=-1) * x.norm(dim=-1)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    return err, norms, loss


def clip_factor(norms: torch.Tensor, clip: float) -> torch.Tensor:
    return (clip / norms.clamp(min=1e-12)).clamp(max=1.0)


def clipped_text_gradient(step: StepLoss, clip: float) -> torch.Tensor:
    """Σ_n clip_C(∂ℓ_n/∂T) per client ``[B, C, E]``: the sum feature mode adds its noise to."""
    err, norms, _ = per_sample_text_grads(step)
    factor = clip_factor(norms, clip) * step.batch.mask
    return step.scale * torch.einsum("bnc,bne->bce", err * factor[..., None], step.batch.x)


@dataclass
class FeatureDP:
    clip: float
    noise_multiplier: float

    @classmethod
    def from_plan(cls, plan) -> FeatureDP:
        return cls(plan.clip, plan.sigma)

    def __call__(self, step, normaliser, noise):
        grad_t = clipped_text_gradient(step, self.clip)
        if self.noise_multiplier > 0:
            grad_t = grad_t + normal_rows(noise, grad_t.shape[1:], grad_t.device) * (self.noise_multiplier * self.clip)
        grad_t = _per_client(grad_t, normaliser)
        outputs, cotangents = [step.text], [grad_t]
        if step.extra is not None:  # data-independent regulariser: no privacy cost
            outputs.append(step.extra)
            cotangents.append(torch.ones_like(step.extra))
        return _grads(outputs, step.leaves, cotangents), withheld(step)


@dataclass
class PerSampleDP:
    clip: float
    noise_multiplier: float
    private_leaves: tuple[str, ...]
    per_record_backward = True  # not a field: every record's backward runs at once

    @classmethod
    def from_plan(cls, plan) -> PerSampleDP:
        return cls(plan.clip, plan.sigma, plan.private_leaves)

    def __call__(self, step, normaliser, noise):
        err, _, _ = per_sample_text_grads(step)
        x, mask = step.batch.x, step.batch.mask
        names = list(step.leaves)
        # per-record cotangents [n, B, C, E]: record n of every client at once (clients' prompts are disjoint)
        cot = step.scale * torch.einsum("bnc,bne->nbce", err, x)
        per_record = torch.autograd.grad(
            step.text,
            [step.leaves[n] for n in names],
            cot,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        per_record = {
            n: (g if g is not None else torch.zeros(cot.shape[0], *step.leaves[n].shape, device=cot.device))
            for n, g in zip(names, per_record)
        }
        out = {}
        private = [n for n in names if n in self.private_leaves]
        if private:
            sq = sum(per_record[n].flatten(2).pow(2).sum(-1) for n in private)  # [n, B]
            factor = clip_factor(sq.sqrt(), self.clip) * mask.t()
            for n in private:
                summed = torch.einsum("nb,nb...->b...", factor, per_record[n])
                if self.noise_multiplier > 0:
                    summed = summed + normal_rows(noise, summed.shape[1:], summed.device) * (
                        self.noise_multiplier * self.clip
                    )
                out[n] = _per_client(summed, normaliser)
        for n in names:
            if n in out:
                continue
            factor = clip_factor(per_record[n].flatten(2).norm(dim=-1), self.clip) * mask.t()
            out[n] = _per_client(torch.einsum("nb,nb...->b...", factor, per_record[n]), normaliser)
        if step.extra is not None:
            extra = _grads(step.extra, step.leaves, retain_graph=True)
            out = {n: out[n] + extra[n] for n in names}
        return out, withheld(step)


@dataclass
class BatchClipReference:
    """The published code's batch clipping: each leaf's batch-mean gradient clipped to C, noise std
    σ·C/B on the private leaves (B = the client's expected batch)."""

    clip: float
    noise_multiplier: float
    private_leaves: tuple[str, ...]

    @classmethod
    def from_plan(cls, plan) -> BatchClipReference:
        return cls(plan.clip, plan.sigma, plan.private_leaves)

    def __call__(self, step, normaliser, noise):
        grads, _ = BatchMean()(step, normaliser, noise)
        out = {}
        for n, g in grads.items():
            norms = g.flatten(1).norm(dim=-1).view(-1, *[1] * (g.dim() - 1))
            g = g * (self.clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            if n in self.private_leaves and self.noise_multiplier > 0:
                std = self.noise_multiplier * self.clip / normaliser.to(g.device, g.dtype)
                g = g + normal_rows(noise, g.shape[1:], g.device) * std.view(-1, *[1] * (g.dim() - 1))
            out[n] = g
        return out, withheld(step)
