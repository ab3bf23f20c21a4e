"""PromptFolio (Pan et al., NeurIPS 2024): a global prompt (FedAvg'd) and a local prompt, whose class
text features are mixed as a "prompt portfolio", T = (1 − θ)·T_global + θ·T_local.

θ is the portfolio coefficient (``train.promptfolio_theta``): 0 is PromptFL's global prompt alone, 1
CoOp's local prompt alone. The public code's example run uses θ = 0.4, pfpl's default. Like the
public code, the mix is not renormalised (each part is a unit vector; their mix is shorter). The
classifier is the mix of two prompts' features, not one context: the released prompt cannot be a
single context artifact (``Spec.one_context = False``).
"""

from __future__ import annotations

import torch

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf

DEFAULT_THETA = 0.4


def mix(global_features: torch.Tensor, local_features: torch.Tensor, theta: float) -> torch.Tensor:
    """The portfolio of two prompts' class text features."""
    return (1 - theta) * global_features + theta * local_features


class PromptFolio(Method):
    name = "promptfolio"
    params = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))

    @property
    def theta(self) -> float:
        return float(self.settings.extra.get("promptfolio_theta", DEFAULT_THETA))

    def init_shared(self, n_ctx, dim, gen):
        return {"global": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        # the local prompt starts where the global one does when a phrase is given (both are prompts in
        # their own right, not an offset), else from its own random draw
        return {"local": self.start(n_ctx, dim, gen)}

    def views(self, params, gens):
        g, local = leaf(params["global"]), leaf(params["local"])
        # ``ctx`` holds both prompts [B, 2, M, D]; the classifier is their features' mix (text_features)
        return Views({"global": g, "local": local}, torch.stack([g, local], dim=1))

    def text_features(self, tower, views):
        b = views.ctx.shape[0]
        both = tower(views.ctx.flatten(0, 1)[:, None])  # [2B, C, E], one tower call
        return mix(both[0::2], both[1::2], self.theta) if b else both[:0]

    def release_features(self, tower, params, gens):
        with torch.no_grad():
            return self.text_features(tower, self.views(params, gens))
