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
  for the server's global DP. Vision prompts reach a record's loss through its own image feature
  too: each record runs the prompted image layers on its own copy of its client's vision prompts, so
  one backward pass gives every record's gradient w.r.t. them (:func:`per_record_gradients`).
  Feature mode cannot cover vision prompts (their gradient is not a function of ∂ℓ/∂T) and refuses them.
- :class:`BatchClipReference` — the published DP-FPL code's batch clipping, for comparison only:
  its ε is nominal (no formal guarantee).

Each returns the leaves' gradients normalised by the clients' expected batch size, and the
clients' training loss — a diagnostic no mechanism covers, so the private mechanisms withhold it
(NaN): what a client sends in a private run is the mechanism's output and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from pfpl.data.clients import Batch
from pfpl.errors import PrivacyConfigError
from pfpl.streams import Draws, normal_rows


@dataclass
class Head:
    """A classifier that is not ``scale · x · T`` (pFedMoAP's gate, FedOTP's transport plan): logits from
    data-independent ``inputs`` (functions of the leaves: class text features, gate weights) and each
    record's own data. Every leaf reaches the loss only through ``inputs``, so feature mode clips each
    record's gradient w.r.t. all of them jointly (:func:`head_record_gradients`): sample-level DP of
    everything after the noise, as for T alone."""

    inputs: dict[str, torch.Tensor]  # [B, ...] each, functions of the leaves (or leaves)
    #: (inputs, data) -> logits [B, n, C]; ``data``: ``x`` [B, n, E] and ``extra`` [B, n, ...] each
    fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-record data beyond x (FedOTP's plan)


@dataclass
class StepLoss:
    """One step of B clients, as a gradient mechanism sees it."""

    leaves: dict[str, torch.Tensor]  # [B, ...], require grad
    text: torch.Tensor  # [B, C, E] normalised class text features, a function of the leaves
    batch: Batch
    scale: float  # CLIP's logit scale
    extra: torch.Tensor | None = None  # a data-independent regulariser of the leaves (FedPGP)
    #: [B, depth, P, W] vision prompts (a function of the leaves) and the prompted image tower that
    #: turns ``batch.tokens`` into image features with them; None: ``batch.x`` are the image features
    vision: torch.Tensor | None = None
    vision_tower: object = None
    head: Head | None = None  # the method's own classifier (None: scale · x · T)
    _x: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def x(self) -> torch.Tensor:
        """``[B, n, E]`` the records' image features (a function of the vision prompts, if any)."""
        if self.vision is None:
            return self.batch.x
        if self._x is None:
            self._x = self.vision_tower(self.batch.tokens, self.vision)
        return self._x

    def logits(self) -> torch.Tensor:
        if self.head is not None:
            return self.head.fn(self.head.inputs, self.head_data())
        return self.scale * torch.einsum("bne,bce->bnc", self.x, self.text)

    def head_data(self) -> dict[str, torch.Tensor]:
        """The records' data a :class:`Head` reads, ``[B, n, ...]`` each."""
        return {"x": self.x, **(self.head.extra if self.head is not None else {})}


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
    y, mask = step.batch.y, step.batch.mask
    with torch.no_grad():
        x = step.x.detach()
        logits = step.scale * torch.einsum("bne,bce->bnc", x, step.text)
        err = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        err = err * mask[..., None]
        norms = step.scale * err.norm(dim=-1) * x.norm(dim=-1)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    return err, norms, loss


def head_record_gradients(step: StepLoss) -> dict[str, torch.Tensor]:
    """``[n, B, ...]``: record n's cross-entropy gradient w.r.t. every input of the step's :class:`Head`
    (zero for padding), by ``torch.func`` (vmap over records of the gradient of one record's loss)."""
    head = step.head
    inputs = {k: v.detach() for k, v in head.inputs.items()}
    data = {k: v.detach() for k, v in step.head_data().items()}

    def loss(inp, record, y):  # record n of every client: clients' inputs are disjoint slices
        logits = head.fn(inp, {k: v[:, None] for k, v in record.items()})[:, 0]
        return F.cross_entropy(logits, y, reduction="sum")

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1, 1))(inputs, data, step.batch.y)
    mask = step.batch.mask.t()
    return {k: g * mask.view(*mask.shape, *[1] * (g.dim() - 2)).to(g) for k, g in grads.items()}


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
        if step.vision is not None:
            raise PrivacyConfigError(
                "dp.mode='feature' cannot cover vision prompts (their gradient is not a function of the class "
                "text features' gradient); use dp.mode='per-sample'"
            )
        if step.head is not None:
            return self._head(step, normaliser, noise)
        grad_t = clipped_text_gradient(step, self.clip)
        if self.noise_multiplier > 0:
            grad_t = grad_t + normal_rows(noise, grad_t.shape[1:], grad_t.device) * (self.noise_multiplier * self.clip)
        grad_t = _per_client(grad_t, normaliser)
        outputs, cotangents = [step.text], [grad_t]
        if step.extra is not None:  # data-independent regulariser: no privacy cost
            outputs.append(step.extra)
            cotangents.append(torch.ones_like(step.extra))
        return _grads(outputs, step.leaves, cotangents), withheld(step)

    def _head(self, step, normaliser, noise):
        """Each record's gradient w.r.t. all the head's inputs clipped jointly to C, summed, noised
        N(0, σ²C²) per entry, then backpropagated to the leaves once."""
        grads = head_record_gradients(step)
        sq = sum(g.flatten(2).pow(2).sum(-1) for g in grads.values())  # [n, B]
        factor = clip_factor(sq.sqrt(), self.clip) * step.batch.mask.t()
        outputs, cotangents = [], []
        for name, g in grads.items():
            summed = torch.einsum("nb,nb...->b...", factor, g)
            if self.noise_multiplier > 0:
                summed = summed + normal_rows(noise, summed.shape[1:], summed.device) * (
                    self.noise_multiplier * self.clip
                )
            outputs.append(step.head.inputs[name])
            cotangents.append(_per_client(summed, normaliser))
        if step.extra is not None:
            outputs.append(step.extra)
            cotangents.append(torch.ones_like(step.extra))
        return _grads(outputs, step.leaves, cotangents), withheld(step)


def per_record_gradients(step: StepLoss) -> dict[str, torch.Tensor]:
    """``[n, B, ...]`` record n's gradient of its own cross-entropy w.r.t. every leaf (zero for padding).

    Through the text: ``scale · err_n ⊗ x_n`` w.r.t. T, backpropagated for every record at once (a
    batched backward). Through the image: record n's prompted feature reads only its own tokens, so with
    a copy of its client's vision prompts per record one backward pass of the summed loss yields each
    record's gradient w.r.t. its copy; that is carried back to the leaves in the same batched backward.
    """
    names = list(step.leaves)
    outputs, cotangents = [], []
    if step.vision is not None and step.head is not None:
        raise ValueError("vision prompts with a method's own classifier head are not supported")
    if step.vision is not None:
        b, n = step.batch.y.shape
        copies = step.vision.detach()[:, None].expand(b, n, *step.vision.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            x = step.vision_tower(step.batch.tokens, copies)
            logits = step.scale * torch.einsum("bne,bce->bnc", x, step.text.detach())
            ce = F.cross_entropy(logits.flatten(0, 1), step.batch.y.flatten(), reduction="none")
            (grad_copies,) = torch.autograd.grad((ce.view_as(step.batch.y) * step.batch.mask).sum(), copies)
        step._x = x.detach()  # the records' prompted features, for the text path below
        outputs.append(step.vision)
        cotangents.append(grad_copies.transpose(0, 1))
    if step.head is not None:  # the method's own classifier: every leaf reaches it through its inputs
        for name, g in head_record_gradients(step).items():
            outputs.append(step.head.inputs[name])
            cotangents.append(g)
    elif step.text.requires_grad:
        err, _, _ = per_sample_text_grads(step)
        # per-record cotangents [n, B, C, E]: record n of every client at once (clients' prompts are disjoint)
        outputs.append(step.text)
        cotangents.append(step.scale * torch.einsum("bnc,bne->nbce", err, step.x.detach()))
    n_records = step.batch.y.shape[1]
    got = torch.autograd.grad(
        outputs,
        [step.leaves[k] for k in names],
        cotangents,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )
    return {
        k: (g if g is not None else torch.zeros(n_records, *step.leaves[k].shape, device=step.batch.y.device))
        for k, g in zip(names, got)
    }


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
        mask = step.batch.mask
        names = list(step.leaves)
        per_record = per_record_gradients(step)
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
