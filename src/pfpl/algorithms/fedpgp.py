"""FedPGP (Cui et al., ICML 2024): global prompt σ + a learned low-rank local U·V, with a contrastive
term that pulls σ's class text features towards the hand-crafted prompt's and pushes them from the
personalised prompt's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf, normal


class FedPGP(Method):
    name = "fedpgp"
    params = (
        Param("global", Scope.GROUP),
        Param("U", Scope.LOCAL, private=True),
        Param("V", Scope.LOCAL, private=True),
    )

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        r, s = self.settings.rank, self.settings.init_std
        # after a phrase U starts at zero and V random: U·V = 0, and both can still move
        return {"U": self.offset((n_ctx, r), gen), "V": normal((r, dim), s, gen)}

    def views(self, params, gens):
        g, u, v = leaf(params["global"]), leaf(params["U"]), leaf(params["V"])
        return Views({"global": g, "U": u, "V": v}, g + u @ v)

    def extra_loss(self, views, text_features, tower, reference):
        if self.settings.fedpgp_mu == 0 or reference is None:
            return None
        global_features = tower(views.leaves["global"][:, None])  # [B, C, E]
        t = self.settings.fedpgp_temperature
        pos = F.cosine_similarity(global_features, reference[None].to(global_features.device), dim=-1) / t
        neg = F.cosine_similarity(global_features, text_features, dim=-1) / t
        loss = -torch.log_softmax(torch.stack([pos, neg], dim=-1), dim=-1)[..., 0]
        return self.settings.fedpgp_mu * loss.mean(dim=-1).sum()
