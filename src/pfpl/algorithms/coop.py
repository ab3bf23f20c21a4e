"""CoOp, local only: every client learns its own prompt; nothing is shared (Zhou et al., IJCV 2022)."""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf


class CoOp(Method):
    name = "coop"
    params = (Param("local", Scope.LOCAL, private=True),)

    def init_shared(self, n_ctx, dim, gen):
        return {}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"local": self.start(n_ctx, dim, gen)}

    def views(self, params, gens):
        local = leaf(params["local"])
        return Views({"local": local}, local)
