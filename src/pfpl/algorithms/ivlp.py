"""IVLP (independent vision-language prompts; Rasheed et al., CVPR 2023, as the IJCAI 2025 federated
study runs it): a shared text context and a shared set of vision prompts, learned side by side with
no coupling, both FedAvg'd."""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf
from pfpl.algorithms.multimodal import random_vision


class IVLP(Method):
    name = "ivlp"
    # local DP noises both shared prompts: together they are the whole released prompt
    params = (Param("global", Scope.GROUP, private=True), Param("vision", Scope.GROUP, private=True))

    @property
    def prompts_vision(self) -> bool:
        return True

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen), "vision": random_vision(self.settings, self.name, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {}

    def views(self, params, gens):
        g, v = leaf(params["global"]), leaf(params["vision"])
        return Views({"global": g, "vision": v}, g, vision=v)
