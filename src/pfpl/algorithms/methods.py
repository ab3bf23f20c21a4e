"""The methods of DESIGN §1, each a few lines on top of :mod:`pfpl.algorithms.base`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfpl.algorithms.base import Method, Views, leaf, normal
from pfpl.prompts.factorization import eq4_gradient, factorize


class CoOp(Method):
    """Local only: every client learns its own prompt; nothing is shared."""

    name = "coop"
    local_params = ("local",)
    private_leaves = ("local",)

    def init(self, n_clients, n_ctx, dim, gen):
        return {"local": normal((n_clients, n_ctx, dim), self.settings.init_std, gen)}

    def views(self, params, gen):
        local = leaf(params["local"])
        return Views({"local": local}, local)


class PromptFL(Method):
    """One global prompt, FedAvg'd; no personalisation (Guo et al., TMC 2023)."""

    name = "promptfl"
    global_params = ("global",)
    private_leaves = ("global",)

    def init(self, n_clients, n_ctx, dim, gen):
        return {"global": normal((n_ctx, dim), self.settings.init_std, gen)}

    def views(self, params, gen):
        g = leaf(params["global"])
        return Views({"global": g}, g)


class FedOTPLite(Method):
    """Global prompt + full-rank local prompt, summed (DP-FPL's re-implementation, no optimal transport)."""

    name = "fedotp"
    global_params = ("global",)
    local_params = ("local",)
    private_leaves = ("local",)

    def init(self, n_clients, n_ctx, dim, gen):
        return {"global": normal((n_ctx, dim), self.settings.init_std, gen),
                "local": normal((n_clients, n_ctx, dim), self.settings.init_std, gen)}

    def views(self, params, gen):
        g, local = leaf(params["global"]), leaf(params["local"])
        return Views({"global": g, "local": local}, g + local)


class FedPGP(Method):
    """Global prompt σ + learned low-rank local U·V, with FedPGP's contrastive term (Cui et al., ICML 2024):
    σ's class text features are pulled to the hand-crafted prompt's and pushed from the personalised prompt's."""

    name = "fedpgp"
    global_params = ("global",)
    local_params = ("U", "V")
    private_leaves = ("U", "V")

    def init(self, n_clients, n_ctx, dim, gen):
        r, s = self.settings.rank, self.settings.init_std
        return {"global": normal((n_ctx, dim), s, gen), "U": normal((n_clients, n_ctx, r), s, gen),
                "V": normal((n_clients, r, dim), s, gen)}

    def views(self, params, gen):
        g, u, v = leaf(params["global"]), leaf(params["U"]), leaf(params["V"])
        return Views({"global": g, "U": u, "V": v}, g + u @ v)

    def extra_loss(self, views, text_features, tower, reference):
        if self.settings.fedpgp_mu == 0 or reference is None:
            return None
        global_features = tower(views.leaves["global"][:, None])  # [B, C, E]
        t = self.settings.fedpgp_temperature
        pos = F.cosine_similarity(global_features, reference[None], dim=-1) / t
        neg = F.cosine_similarity(global_features, text_features, dim=-1) / t
        loss = -torch.log_softmax(torch.stack([pos, neg], dim=-1), dim=-1)[..., 0]
        return self.settings.fedpgp_mu * loss.mean(dim=-1).sum()


class DPFPL(Method):
    """Global prompt + local prompt P factorised at every step as u·v + r (Tran et al., ICLR 2025).
    The forward pass uses global + u·v + r; only u and v get gradients, and P's update is rebuilt
    from them with Eq. 4. The residual gets no gradient and no noise."""

    name = "dpfpl"
    global_params = ("global",)
    local_params = ("local",)
    private_leaves = ("u", "v")
    residual = True

    def init(self, n_clients, n_ctx, dim, gen):
        return {"global": normal((n_ctx, dim), self.settings.init_std, gen),
                "local": normal((n_clients, n_ctx, dim), self.settings.init_std, gen)}

    def views(self, params, gen):
        u, v, r = factorize(params["local"].detach(), self.settings.rank, gen)
        g, u, v = leaf(params["global"]), leaf(u), leaf(v)
        ctx = g + u @ v + (r if self.residual else 0)
        return Views({"global": g, "u": u, "v": v}, ctx, aux={"u": u.detach(), "v": v.detach()})

    def param_grads(self, views, leaf_grads):
        local = eq4_gradient(leaf_grads["u"], leaf_grads["v"], views.aux["u"], views.aux["v"])
        return {"global": leaf_grads["global"], "local": local}


class DPLoRA(DPFPL):
    """DP-FPL without the residual: the forward pass uses global + u·v only."""

    name = "dplora"
    residual = False


METHODS: dict[str, type[Method]] = {m.name: m for m in (CoOp, PromptFL, FedOTPLite, FedPGP, DPLoRA, DPFPL)}
