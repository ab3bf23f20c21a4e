"""PromptFL: one global prompt, FedAvg'd; no personalisation (Guo et al., TMC 2023)."""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf


class PromptFL(Method):
    name = "promptfl"
    # local DP noises the shared prompt itself: it is the whole released prompt
    params = (Param("global", Scope.GROUP, private=True),)

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {}

    def views(self, params, gens):
        g = leaf(params["global"])
        return Views({"global": g}, g)
