"""DP-FPL (Tran et al., ICLR 2025) and its DP-LoRA ablation, on the text tower, the image tower or both
(``prompt.modality``).

Global prompt + local prompt P, factorised at every step as u·v + r from a fresh random start
drawn from each client's own stream. The forward pass uses global + u·v + r; only u and v get
gradients, and P's update is rebuilt from them with Eq. 4. The residual gets no gradient and no
noise. On the image tower the same split applies to the vision prompts ``[depth, P, W]``, factorised
as one ``depth·P × W`` matrix; with ``modality = "vision"`` the text classifier is the frozen template.
"""

from __future__ import annotations

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf
from pfpl.algorithms.multimodal import FrozenText, placeholder_context, random_vision
from pfpl.prompts.factorization import eq4_gradient, factorize

MODALITIES = ("text", "vision", "both")
_TEXT = (Param("global", Scope.GROUP), Param("local", Scope.LOCAL, private=True))
_VISION = (Param("vglobal", Scope.GROUP), Param("vlocal", Scope.LOCAL, private=True))


class DPFPL(FrozenText):
    name = "dpfpl"
    params = _TEXT
    leaf_params = {"u": "local", "v": "local"}
    residual = True

    def __init__(self, settings=None):
        super().__init__(settings)
        modality = self.settings.modality
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: allowed {', '.join(MODALITIES)}")
        self.on_text, self.on_vision = modality in ("text", "both"), modality in ("vision", "both")
        self.params = (_TEXT if self.on_text else ()) + (_VISION if self.on_vision else ())
        self.leaf_params = ({"u": "local", "v": "local"} if self.on_text else {}) | (
            {"vu": "vlocal", "vv": "vlocal"} if self.on_vision else {}
        )

    @property
    def prompts_vision(self) -> bool:
        return self.on_vision

    def init_shared(self, n_ctx, dim, gen):
        out = {"global": self.start(n_ctx, dim, gen)} if self.on_text else {}
        if self.on_vision:
            out["vglobal"] = random_vision(self.settings, self.name, gen)
        return out

    def init_local(self, n_ctx, dim, gen, held=None):
        out = {"local": self.offset((n_ctx, dim), gen)} if self.on_text else {}
        if self.on_vision:
            out["vlocal"] = random_vision(self.settings, self.name, gen)
        return out

    def _split(self, global_: str, local: str, params, gens, names: tuple[str, str], shape=None):
        """(leaves, prompt, aux) of global + u·v (+ r) for one tower; vision prompts factorise flattened."""
        p = params[local].detach()
        flat = p.reshape(p.shape[0], -1, p.shape[-1])
        u, v, r = factorize(flat, self.settings.rank, gens)
        g, u, v = leaf(params[global_]), leaf(u), leaf(v)
        low = u @ v + (r if self.residual else 0)
        prompt = g + low.view_as(p)
        return {global_: g, names[0]: u, names[1]: v}, prompt, {names[0]: u.detach(), names[1]: v.detach()}

    def views(self, params, gens):
        leaves, aux, ctx, vision = {}, {}, None, None
        if self.on_text:
            part, ctx, a = self._split("global", "local", params, gens, ("u", "v"))
            leaves, aux = {**leaves, **part}, {**aux, **a}
        if self.on_vision:
            part, vision, a = self._split("vglobal", "vlocal", params, gens, ("vu", "vv"))
            leaves, aux = {**leaves, **part}, {**aux, **a}
        return Views(leaves, ctx if ctx is not None else placeholder_context(vision), aux=aux, vision=vision)

    def param_grads(self, views, leaf_grads):
        out = {}
        if self.on_text:
            out["global"] = leaf_grads["global"]
            out["local"] = eq4_gradient(leaf_grads["u"], leaf_grads["v"], views.aux["u"], views.aux["v"])
        if self.on_vision:
            local = eq4_gradient(leaf_grads["vu"], leaf_grads["vv"], views.aux["vu"], views.aux["vv"])
            out["vglobal"] = leaf_grads["vglobal"]
            out["vlocal"] = local.view_as(leaf_grads["vglobal"])
        return out

    # the frozen template is the classifier only where the text tower is not prompted
    def text_features(self, tower, views):
        return super().text_features(tower, views) if not self.on_text else Method.text_features(self, tower, views)

    def release_features(self, tower, params, gens):
        if not self.on_text:
            return super().release_features(tower, params, gens)
        return Method.release_features(self, tower, params, gens)


class DPLoRA(DPFPL):
    """DP-FPL without the residual: the forward pass uses global + u·v only."""

    name = "dplora"
    residual = False
