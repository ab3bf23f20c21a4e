"""MaPLe-style coupled prompts (Khattak et al., CVPR 2023): the vision prompts are projected from the
text context, so one prompt drives both towers. Each prompted image layer j has its own linear
coupling ``W_j`` (``D → W``) and bias; layer j's P vision tokens are the first P text context tokens
projected by it. The text context and the couplings are shared and FedAvg'd.

pfpl's text tower takes its prompt at the input only, so where MaPLe has fresh text prompts per layer
this projects the one input context into every prompted image layer.
"""

from __future__ import annotations

import math

import torch

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf
from pfpl.algorithms.multimodal import vision_shape


class MaPLe(Method):
    name = "maple"
    params = (
        Param("global", Scope.GROUP, private=True),
        Param("coupling", Scope.GROUP, private=True),
        Param("coupling_bias", Scope.GROUP, private=True),
    )

    @property
    def prompts_vision(self) -> bool:
        return True

    def _shape(self, n_ctx: int) -> tuple[int, int, int]:
        depth, tokens, width = vision_shape(self.settings, self.name)
        if tokens > n_ctx:
            raise ValueError(
                f"maple projects {tokens} vision tokens from the text context's first tokens: n_ctx {n_ctx}"
            )
        return depth, tokens, width

    def init_shared(self, n_ctx, dim, gen):
        depth, _, width = self._shape(n_ctx)
        coupling = torch.randn(depth, dim, width, generator=gen) / math.sqrt(dim)
        return {"global": self.start(n_ctx, dim, gen), "coupling": coupling, "coupling_bias": torch.zeros(depth, width)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {}

    def views(self, params, gens):
        g, w, bias = leaf(params["global"]), leaf(params["coupling"]), leaf(params["coupling_bias"])
        _, tokens, _ = self._shape(g.shape[-2])
        vision = torch.einsum("bpd,bjdw->bjpw", g[:, :tokens], w) + bias[:, :, None]
        return Views({"global": g, "coupling": w, "coupling_bias": bias}, g, vision=vision)
