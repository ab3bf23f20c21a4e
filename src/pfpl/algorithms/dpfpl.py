"""DP-FPL (Tran et al., ICLR 2025) and its DP-LoRA ablation.

Global prompt + local prompt P, factorised at every step as u·v + r from a fresh random start
drawn from each client's own stream. The forward pass uses global + u·v + r; only u and v get
gradients, and P's update is rebuilt from them with Eq. 4. The residual gets no gradient and no
noise.
"""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf
from pfpl.prompts.factorization import eq4_gradient, factorize


class DPFPL(Method):
    name = "dpfpl"
    params = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))
    leaf_params = {"u": "local", "v": "local"}
    residual = True

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"local": self.offset((n_ctx, dim), gen)}

    def views(self, params, gens):
        u, v, r = factorize(params["local"].detach(), self.settings.rank, gens)
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
