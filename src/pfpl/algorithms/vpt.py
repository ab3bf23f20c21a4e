"""Federated VPT (Jia et al., ECCV 2022, as the IJCAI 2025 federated prompt-learning study runs it):
one shared set of vision prompts in the image tower, FedAvg'd; the text classifier is the frozen
hand-crafted template."""

from __future__ import annotations

from pfpl.algorithms.base import Param, Scope, Views, leaf
from pfpl.algorithms.multimodal import FrozenText, placeholder_context, random_vision


class VPT(FrozenText):
    name = "vpt"
    # local DP noises the shared vision prompt itself: it is the whole released prompt
    params = (Param("vision", Scope.GROUP, private=True),)

    @property
    def prompts_vision(self) -> bool:
        return True

    def init_shared(self, n_ctx, dim, gen):
        return {"vision": random_vision(self.settings, self.name, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {}

    def views(self, params, gens):
        v = leaf(params["vision"])
        return Views({"vision": v}, placeholder_context(v), vision=v)
