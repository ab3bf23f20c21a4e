"""FedOTP-lite: global prompt + full-rank local prompt, summed (DP-FPL's re-implementation of
FedOTP, without optimal transport)."""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf


class FedOTPLite(Method):
    name = "fedotp"
    params = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"local": self.offset((n_ctx, dim), gen)}

    def views(self, params, gens):
        g, local = leaf(params["global"]), leaf(params["local"])
        return Views({"global": g, "local": local}, g + local)
