"""FedOTP (Li et al., CVPR 2024) and FedOTP-lite.

**FedOTP**: a global prompt (FedAvg'd) and a local prompt; an image is scored against a class by
aligning its patch features with the two prompts' class text features by unbalanced optimal transport.
For image x (patch features z_1 … z_P) and class c, with similarities S_pk = ⟨z_p, t_k,c⟩ of patch p and
prompt k ∈ {global, local}, the plan T (P × 2) minimises ⟨T, 1 − S⟩ − ε·H(T) subject to

    Tᵀ1 = ρ/2 · 1   (each prompt carries mass ρ/2)     T1 ≤ 1/P · 1   (no patch gives more than its share)

— the public code's "COT" variant (a partial transport of mass ρ = 0.8, ε = 0.01), solved by Sinkhorn
scaling (``u = min(a / Kv, 1)``, ``v = b / Kᵀu``, at most 100 iterations, until v changes by less than
1e-3 relatively). The logit is ``s · Σ T ⊙ S``; as in the public code the plan is a constant of the step
(computed without gradient), so every prompt parameter reaches the loss only through the class text
features and feature-mode DP covers it (per-record gradients w.r.t. both prompts' features, clipped
jointly). The patch features come from the frozen image tower once, cached beside the pooled ones
(:mod:`pfpl.backbones.patches`; ``Features.tokens``).

**FedOTP-lite**: global prompt + full-rank local prompt, summed, no transport (DP-FPL's
re-implementation of FedOTP, the baseline of its tables).
"""

from __future__ import annotations

import torch

from pfpl.algorithms.base import Classifier, Method, Param, Scope, Views, leaf
from pfpl.privacy.mechanisms import Head

DEFAULTS = {"fedotp_mass": 0.8, "fedotp_eps": 0.01, "fedotp_iterations": 100, "fedotp_tolerance": 1e-3}


@torch.no_grad()
def transport_plan(
    sim: torch.Tensor, mass: float = 0.8, eps: float = 0.01, iterations: int = 100, tolerance: float = 1e-3
) -> torch.Tensor:
    """``[..., P, K]`` entropic unbalanced transport plans for similarities ``sim`` ``[..., P, K]``: column
    sums ``mass / K`` (exact after the last scaling), row sums at most ``1 / P`` (to the tolerance the
    iterations reach). Computed in float64; the cost is shifted per problem (the plan does not change:
    a constant factor of the kernel is absorbed by the column scaling)."""
    p, k = sim.shape[-2:]
    cost = (1.0 - sim.double()).flatten(-2)
    cost = (cost - cost.min(dim=-1, keepdim=True).values).view(sim.shape)
    kernel = torch.exp(-cost / eps)
    a, b = 1.0 / p, mass / k
    u = torch.ones(sim.shape[:-1], dtype=torch.float64, device=sim.device)
    v = torch.ones((*sim.shape[:-2], k), dtype=torch.float64, device=sim.device)
    for _ in range(iterations):
        previous = v
        u = torch.clamp(a / torch.einsum("...pk,...k->...p", kernel, v).clamp(min=1e-300), max=1.0)
        v = b / torch.einsum("...pk,...p->...k", kernel, u).clamp(min=1e-300)
        if float(((v - previous).abs() / v.abs().clamp(min=1e-300)).max()) < tolerance:
            break
    return (u[..., :, None] * kernel * v[..., None, :]).to(sim.dtype)


class FedOTP(Method):
    name = "fedotp"
    params = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))

    def setting(self, key: str):
        return self.settings.extra.get(key, DEFAULTS[key])

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"local": self.start(n_ctx, dim, gen)}  # a prompt of its own (transported beside the global one)

    def prepare(self, tower):
        self.scale = float(tower.backbone.logit_scale)

    def views(self, params, gens):
        g, local = leaf(params["global"]), leaf(params["local"])
        return Views({"global": g, "local": local}, torch.stack([g, local], dim=1))  # [B, 2, M, D]

    def text_features(self, tower, views):
        b = views.ctx.shape[0]
        return tower(views.ctx.flatten(0, 1)[:, None]).view(b, 2, tower.num_classes, -1)  # [B, 2, C, E]

    def plan(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, n, C, P, 2]`` plans of images ``patches`` ``[B, n, P, E]`` for prompts' features ``[B, 2, C, E]``."""
        sim = torch.einsum("bnpe,bkce->bncpk", patches, text.detach())
        return transport_plan(
            sim,
            float(self.setting("fedotp_mass")),
            float(self.setting("fedotp_eps")),
            int(self.setting("fedotp_iterations")),
            float(self.setting("fedotp_tolerance")),
        )

    def head(self, views, text_features, batch):
        if batch.tokens is None:
            raise ValueError("FedOTP needs the records' patch features (ClientData(..., tokens=patches))")
        patches = batch.tokens.to(text_features)
        plan = self.plan(patches, text_features)
        return Head({"text": text_features}, self._logits, {"tokens": patches, "plan": plan})

    def _logits(self, inputs: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> torch.Tensor:
        sim = torch.einsum("bnpe,bkce->bncpk", data["tokens"], inputs["text"])
        return getattr(self, "scale", 1.0) * (data["plan"] * sim).sum((-2, -1))

    def release_features(self, tower, params, gens):
        with torch.no_grad():
            text = self.text_features(tower, self.views(params, gens))

        def scores(row, features, index, chunk: int = 4096):
            if features.tokens is None:
                raise ValueError("FedOTP is scored on patch features: these records carry none")
            out = []
            for i in range(0, len(index), chunk):
                patches = features.tokens[index[i : i + chunk].to(features.tokens.device)].to(text)[None]
                t = text[row : row + 1]
                out.append(self._logits({"text": t}, {"tokens": patches, "plan": self.plan(patches, t)})[0])
            return torch.cat(out) if out else text.new_zeros(0, text.shape[2])

        return Classifier(scores, text.shape[0], needs_tokens=True)


class FedOTPLite(Method):
    name = "fedotp-lite"
    params = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"local": self.offset((n_ctx, dim), gen)}

    def views(self, params, gens):
        g, local = leaf(params["global"]), leaf(params["local"])
        return Views({"global": g, "local": local}, g + local)
