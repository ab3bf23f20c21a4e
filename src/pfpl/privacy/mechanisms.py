"""Differentially private gradients and aggregation, plugged into the simulator's hook points.

Modes (DESIGN §5):

- ``feature``: every prompt parameter reaches the loss only through the class text features T
  ``[C, E]``. Sample n's gradient w.r.t. T is the outer product ``scale·(p_n − e_y) ⊗ x_n``, so its
  norm is known in closed form; each is clipped to C, summed, N(0, σ²C²) is added, and the noisy sum
  is backpropagated through the text tower once. Everything after the noise is post-processing:
  sample-level DP for the whole released prompt at about the cost of a non-private step.
- ``per-sample``: exact per-sample gradients of the method's private leaves (DP-FPL: u, v) from one
  forward pass and a vmapped backward over per-sample cotangents; jointly clipped to C and noised on
  the client (LDP in the paper's sense). Shared (global) leaves are clipped per sample and sent
  without noise; the server adds N(0, σ_G²C²·s²) to their aggregate (GDP), s = the largest per-record
  weight in the aggregate.
- ``reference``: the published DP-FPL code's batch clipping (each leaf's batch-mean gradient clipped
  to C, std σ·C/B with σ = √(T·ln(1/δ))/ε, server std σ·C/B/N). Its ε is *nominal*: batch clipping
  has sensitivity up to 2C, not C/B, so no formal guarantee holds.

Client-level DP (clip each client's global gradient or update to S, noise the mean) is separate and
accounted separately, with client-level adjacency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfpl.algorithms.base import Views
from pfpl.privacy.accounting import Mechanism, PrivacyConfigError, calibrate_noise, epsilon

DP_MODES = ("off", "feature", "per-sample", "reference")
# the published code has no DP CoOp baseline, so ``reference`` has no counterpart to reproduce for it
REFERENCE_METHODS = ("promptfl", "fedotp", "fedpgp", "dplora", "dpfpl")


@dataclass
class DPSettings:
    mode: str = "off"
    clip: float = 10.0
    noise_multiplier: float = 0.0  # σ of the sample-level mechanism (feature, or per-sample local)
    global_noise_multiplier: float = 0.0  # σ_G at the server (per-sample mode)
    reference_sigma: float = 0.0  # the published code's σ (reference mode)
    client_clip: float = 0.0  # S; 0 = no client-level DP
    client_noise_multiplier: float = 0.0


def per_sample_text_grads(scale: float, x: torch.Tensor, text: torch.Tensor, y: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(err ``[B, n, C]``, per-sample gradient norms ``[B, n]``, per-client mean loss ``[B]``).

    Sample n's cross-entropy gradient w.r.t. T is ``scale · err_n ⊗ x_n`` with ``err = p − e_y``.
    """
    with torch.no_grad():
        logits = scale * torch.einsum("bne,bce->bnc", x, text)
        err = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        err = err * mask[..., None]
        norms = scale * err.norm(dim=-1) * x.norm(dim=-1)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    return err, norms, loss


def clipped_text_gradient(scale: float, x: torch.Tensor, text: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                          clip: float) -> torch.Tensor:
    """Σ_n clip_C(∂ℓ_n/∂T) per client ``[B, C, E]``: the sum feature mode adds its noise to."""
    err, norms, _ = per_sample_text_grads(scale, x, text, y, mask)
    return _clipped_sum(scale, err, norms, x, mask, clip)


def _clipped_sum(scale: float, err: torch.Tensor, norms: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                 clip: float) -> torch.Tensor:
    factor = _clip_factor(norms, clip) * mask
    return scale * torch.einsum("bnc,bne->bce", err * factor[..., None], x)


def _clip_factor(norms: torch.Tensor, clip: float) -> torch.Tensor:
    return (clip / norms.clamp(min=1e-12)).clamp(max=1.0)


def _extra_grads(sim, views: Views, text: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor] | None:
    extra = sim.method.extra_loss(views, text, sim.tower, sim.reference)
    if extra is None:
        return None
    grads = torch.autograd.grad(extra, [views.leaves[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(views.leaves[n])) for n, g in zip(names, grads)}


class Privatizer:
    """The simulator's ``gradients`` and ``aggregate`` hooks for one DP configuration."""

    def __init__(self, settings: DPSettings, expected_batch: torch.Tensor, private_leaves: tuple[str, ...],
                 global_leaves: tuple[str, ...]):
        self.s = settings
        self.expected_batch = expected_batch.float()  # [N] expected batch size per client
        self.private = private_leaves
        self.shared = tuple(n for n in global_leaves if n not in private_leaves)

    # ---- client side -------------------------------------------------------------------------
    def gradients(self, sim, views: Views, text: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor, active: torch.Tensor, gen: torch.Generator):
        if self.s.mode == "feature":
            return self._feature(sim, views, text, x, y, mask, active, gen)
        if self.s.mode == "per-sample":
            return self._per_sample(sim, views, text, x, y, mask, active, gen)
        if self.s.mode == "reference":
            return self._reference(sim, views, text, x, y, mask, active, gen)
        raise PrivacyConfigError(f"dp.mode={self.s.mode!r} has no gradient mechanism; allowed: {', '.join(DP_MODES[1:])}")

    def _noise(self, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
        if std == 0:
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * std

    def _feature(self, sim, views, text, x, y, mask, active, gen):
        err, norms, loss = per_sample_text_grads(sim.scale, x, text, y, mask)
        grad_t = _clipped_sum(sim.scale, err, norms, x, mask, self.s.clip)
        grad_t = grad_t + self._noise(tuple(grad_t.shape), self.s.noise_multiplier * self.s.clip, gen)
        grad_t = grad_t / self.expected_batch[active].view(-1, 1, 1)
        names = list(views.leaves)
        extra = sim.method.extra_loss(views, text, sim.tower, sim.reference)
        outputs, cotangents = [text], [grad_t]
        if extra is not None:  # data-independent regulariser: no privacy cost
            outputs.append(extra)
            cotangents.append(torch.ones_like(extra))
        grads = torch.autograd.grad(outputs, [views.leaves[n] for n in names], cotangents, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(views.leaves[n])) for n, g in zip(names, grads)}, loss

    def _per_sample(self, sim, views, text, x, y, mask, active, gen):
        err, _, loss = per_sample_text_grads(sim.scale, x, text, y, mask)
        names = list(views.leaves)
        # per-sample cotangents [n, B, C, E]: sample n of every client at once (clients' prompts are disjoint)
        cot = sim.scale * torch.einsum("bnc,bne->nbce", err, x)
        per_sample = torch.autograd.grad(text, [views.leaves[n] for n in names], cot, is_grads_batched=True,
                                         retain_graph=True, allow_unused=True)
        per_sample = {n: (g if g is not None else torch.zeros(cot.shape[0], *views.leaves[n].shape))
                      for n, g in zip(names, per_sample)}
        expected = self.expected_batch[active]
        out = {}
        private = [n for n in names if n in self.private]
        if private:
            sq = sum(per_sample[n].flatten(2).pow(2).sum(-1) for n in private)  # [n, B]
            factor = _clip_factor(sq.sqrt(), self.s.clip) * mask.t()
            for n in private:
                summed = torch.einsum("nb,nb...->b...", factor, per_sample[n])
                noise = self._noise(tuple(summed.shape), self.s.noise_multiplier * self.s.clip, gen)
                out[n] = (summed + noise) / expected.view(-1, *[1] * (summed.dim() - 1))
        for n in names:
            if n in out:
                continue
            norms = per_sample[n].flatten(2).norm(dim=-1)
            factor = _clip_factor(norms, self.s.clip) * mask.t()
            summed = torch.einsum("nb,nb...->b...", factor, per_sample[n])
            out[n] = summed / expected.view(-1, *[1] * (summed.dim() - 1))
        extra = _extra_grads(sim, views, text, names)
        if extra is not None:
            out = {n: out[n] + extra[n] for n in names}
        return out, loss

    def _reference(self, sim, views, text, x, y, mask, active, gen):
        from pfpl.federation.simulator import batch_gradients

        grads, loss = batch_gradients(sim, views, text, x, y, mask, active, gen)
        std = self.s.reference_sigma * self.s.clip / self.expected_batch[active]  # σ·C/B per client
        out = {}
        for n, g in grads.items():
            norms = g.flatten(1).norm(dim=-1).view(-1, *[1] * (g.dim() - 1))
            g = g * (self.s.clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            if n in self.private:
                g = g + torch.randn(g.shape, generator=gen) * std.view(-1, *[1] * (g.dim() - 1))
            out[n] = g
        return out, loss

    # ---- server side -------------------------------------------------------------------------
    def aggregate(self, values: torch.Tensor, weights: torch.Tensor, active: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
        """Mean of the clients' global gradients/updates, with client-level DP and/or GDP noise."""
        b = values.shape[0]
        if self.s.client_clip > 0:
            norms = values.flatten(1).norm(dim=-1).view(-1, *[1] * (values.dim() - 1))
            clipped = values * (self.s.client_clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            mean = clipped.mean(0)
            return mean + self._noise(tuple(mean.shape), self.s.client_noise_multiplier * self.s.client_clip / b, gen)
        w = weights / weights.sum()
        mean = torch.einsum("b,b...->...", w, values)
        if self.s.mode == "per-sample" and self.shared and self.s.global_noise_multiplier > 0:
            # one record moves its client's clipped sum by ≤ C, i.e. the mean by ≤ C·w_i/B_i
            scale = float((w / self.expected_batch[active]).max())
            mean = mean + self._noise(tuple(mean.shape), self.s.global_noise_multiplier * self.s.clip * scale, gen)
        elif self.s.mode == "reference" and self.shared:
            std = float((self.s.reference_sigma * self.s.clip / self.expected_batch[active]).max()) / b
            mean = mean + self._noise(tuple(mean.shape), std, gen)
        return mean


# ---- accounting ------------------------------------------------------------------------------
def reference_sigma(nominal_epsilon: float, delta: float, rounds: int) -> float:
    """The published code's σ = q·√(T·ln(1/δ))/ε with q = 1 and T = rounds."""
    if math.isinf(nominal_epsilon):
        return 0.0
    return math.sqrt(rounds * math.log(1 / delta)) / nominal_epsilon


def sample_mechanisms(mode: str, sigma: float, sigma_global: float, q: float, steps: int,
                      has_local: bool, has_shared_global: bool) -> list[Mechanism]:
    """The Gaussian mechanisms that touch one client's records, as the released prompt composes them."""
    if mode == "feature":
        return [Mechanism(sigma, q, steps, "feature")]
    mechs = []
    if has_local:
        mechs.append(Mechanism(sigma, q, steps, "local"))
    if has_shared_global:
        mechs.append(Mechanism(sigma_global, q, steps, "global"))
    return mechs


def released_epsilon(mechs: list[Mechanism], delta: float, accountant: str) -> float:
    if not mechs or any(m.noise_multiplier == 0 for m in mechs):
        return math.inf
    return epsilon(mechs, delta, accountant)


def calibrate(target_epsilon: float, delta: float, q: float, steps: int, n_mechanisms: int, accountant: str) -> float:
    """σ (shared by the ``n_mechanisms`` composed mechanisms) so the released prompt meets the target."""
    if math.isinf(target_epsilon):
        return 0.0
    return calibrate_noise(target_epsilon, delta, q, steps, accountant=accountant, n_mechanisms=n_mechanisms)


# ---- a run's privacy plan ---------------------------------------------------------------------
def validate_dp(dp, methods: list[str]) -> None:
    """One clear error for every bad combination, before any training starts."""
    if dp.mode == "off":
        if dp.target_epsilon is not None or dp.noise_multiplier > 0:
            raise PrivacyConfigError("dp.target_epsilon / dp.noise_multiplier are set but dp.mode='off'; "
                                     "set dp.mode to feature, per-sample or reference")
    if dp.mode == "reference":
        unsupported = [m for m in methods if m not in REFERENCE_METHODS]
        if unsupported:
            raise PrivacyConfigError(f"dp.mode='reference' does not support method {unsupported[0]!r} (the published "
                                     f"code has no such baseline); supported: {', '.join(REFERENCE_METHODS)}")
        if dp.target_epsilon is None:
            raise PrivacyConfigError("dp.mode='reference' needs dp.target_epsilon (its nominal ε)")
    if dp.target_epsilon is not None and dp.noise_multiplier > 0:
        raise PrivacyConfigError(f"set either dp.target_epsilon ({dp.target_epsilon}) or dp.noise_multiplier "
                                 f"({dp.noise_multiplier}), not both")
    if dp.client_noise_multiplier > 0 and dp.client_clip == 0:
        raise PrivacyConfigError("dp.client_noise_multiplier > 0 needs dp.client_clip > 0")


@dataclass
class PrivacyPlan:
    """How a method's released prompts are protected, and their ε(δ) per client."""

    mode: str
    delta: float
    accountant: str
    sampling: str
    sigma: float
    sigma_global: float
    has_local: bool
    has_shared_global: bool
    rates: list[float]  # per client: Poisson rate, or 1.0 (shuffle: no amplification claimed)
    steps_per_round: list[int]  # per client: steps (Poisson) or participations of a record (shuffle)
    nominal_epsilon: float | None = None
    client_sigma: float = 0.0
    participation: float = 1.0
    unprotected_global: bool = False  # a shared leaf is released without any noise
    client_steps_per_round: int = 1  # client-level mechanism applications per round (every step in step sync)

    def client_mechanisms(self, client: int, rounds: int) -> list[Mechanism]:
        steps = self.steps_per_round[client] * rounds
        return sample_mechanisms(self.mode, self.sigma, self.sigma_global, self.rates[client], max(steps, 1),
                                 self.has_local, self.has_shared_global)

    def epsilons(self, participations: torch.Tensor) -> list[float]:
        """Each client's ε(δ) for its released prompt after the rounds it took part in."""
        if self.mode == "reference":
            return [float(self.nominal_epsilon)] * len(self.rates)
        if self.unprotected_global or self.mode == "off":
            return [math.inf] * len(self.rates)
        out = []
        for c, rounds in enumerate(participations.tolist()):
            out.append(0.0 if rounds == 0 else released_epsilon(self.client_mechanisms(c, rounds), self.delta, self.accountant))
        return out

    def client_level_epsilon(self, rounds: int) -> float | None:
        if self.client_sigma == 0:
            return None
        steps = rounds * self.client_steps_per_round
        return epsilon(Mechanism(self.client_sigma, self.participation, steps, "client"), self.delta, self.accountant)

    def describe(self) -> dict:
        if self.mode == "reference":
            guarantee = "nominal only: the published code's batch clipping; no formal guarantee"
        elif self.unprotected_global or self.mode == "off":
            guarantee = "none: a shared part of the released prompt carries no noise"
        elif self.mode == "feature":
            guarantee = "sample-level DP of the whole released prompt (post-processing of the noisy text-feature gradients)"
        else:
            parts = (["local DP on the private leaves"] if self.has_local else []) + \
                    (["global DP on the aggregated global gradient"] if self.has_shared_global else [])
            guarantee = "sample-level DP, composition of " + " and ".join(parts)
        return {"mode": self.mode, "delta": self.delta, "accountant": self.accountant, "sampling": self.sampling,
                "adjacency": "add/remove one record of the client's training data",
                "noise_multiplier": self.sigma, "global_noise_multiplier": self.sigma_global,
                "client_noise_multiplier": self.client_sigma, "guarantee": guarantee,
                "nominal": self.mode == "reference"}


def build_privacy(sim, dp, rounds: int, method_name: str) -> PrivacyPlan | None:
    """Calibrate σ for the worst-off client, attach the DP hooks to ``sim``, return the plan."""
    if dp.mode == "off" and dp.client_clip == 0:
        return None
    method = sim.method
    expected = sim.expected_batch()
    sizes = torch.tensor([len(ix) for ix in sim.clients], dtype=torch.float32)
    if dp.sampling == "poisson":
        rates = (expected / sizes).tolist()
        steps = [sim.local_steps] * sim.n_clients
    else:
        rates = [1.0] * sim.n_clients
        steps = [math.ceil(sim.local_steps * float(e) / float(n)) for e, n in zip(expected, sizes)]
    has_local = bool(method.private_leaves)
    shared = tuple(n for n in method.global_params if n not in method.private_leaves)
    has_shared_global = bool(shared) and dp.global_dp and dp.mode == "per-sample"
    n_mech = 1 if dp.mode == "feature" else int(has_local) + int(has_shared_global)
    sigma = dp.noise_multiplier
    nominal = None
    if dp.mode == "reference":
        nominal = dp.target_epsilon
        sigma = reference_sigma(dp.target_epsilon, dp.delta, rounds)
    elif dp.mode != "off" and dp.target_epsilon is not None:
        worst = max(range(sim.n_clients), key=lambda c: (rates[c], steps[c]))
        sigma = calibrate(dp.target_epsilon, dp.delta, rates[worst], steps[worst] * rounds, max(n_mech, 1), dp.accountant)
    settings = DPSettings(mode=dp.mode, clip=dp.clip, noise_multiplier=sigma if dp.mode != "reference" else 0.0,
                          global_noise_multiplier=sigma if has_shared_global else 0.0,
                          reference_sigma=sigma if dp.mode == "reference" else 0.0,
                          client_clip=dp.client_clip, client_noise_multiplier=dp.client_noise_multiplier)
    privatizer = Privatizer(settings, expected, method.private_leaves, method.global_params)
    if dp.mode != "off":
        sim.gradients = privatizer.gradients
        sim.s.sampling = dp.sampling
    sim.aggregate = privatizer.aggregate
    return PrivacyPlan(mode=dp.mode, delta=dp.delta, accountant=dp.accountant, sampling=dp.sampling, sigma=sigma,
                       sigma_global=settings.global_noise_multiplier, has_local=has_local and dp.mode != "feature",
                       has_shared_global=has_shared_global, rates=rates, steps_per_round=steps,
                       nominal_epsilon=nominal, client_sigma=dp.client_noise_multiplier,
                       participation=sim.s.participation,
                       unprotected_global=dp.mode == "per-sample" and bool(shared) and not dp.global_dp,
                       client_steps_per_round=sim.local_steps if sim.s.sync == "step" else 1)
