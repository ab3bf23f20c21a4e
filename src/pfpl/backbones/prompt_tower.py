"""The differentiable prompt → class-text-feature map for ``[SOS] ctx_1 … ctx_M classname . [EOS]``.

The frozen token embeddings of SOS and of ``classname . EOS`` are computed once; learned context
vectors are spliced in between. Any number of prompt sets (e.g. one per client) go through the
text tower in one call, chunked to a memory budget, on only ``max_eot + 1`` positions. When every
class of a prompt set shares its context (and the tower allows it), ``[SOS] ctx`` runs once per
prompt set and only the per-class suffix runs per class (:mod:`pfpl.backbones.prefix_tower`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfpl.backbones import prefix_tower
from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.errors import BackboneError


class PromptTower:
    """Class text features of soft prompts for a fixed list of class names."""

    def __init__(
        self,
        backbone: OpenClipBackbone,
        classnames: list[str],
        n_ctx: int,
        truncate: bool = True,
        max_sequences: int = 4096,
        share_prefix: bool = True,
    ):
        self.backbone = backbone
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        self.truncate = truncate
        self.max_sequences = max_sequences
        self.share_prefix = share_prefix and truncate and prefix_tower.supports(backbone.text)
        #: the prompted image tower of a run with vision prompts (:mod:`pfpl.backbones.vision_tower`), set
        #: by whoever builds the run; None: image features are the cached, prompt-free ones
        self.vision = None
        placeholder = " ".join(["X"] * n_ctx)
        tokens = backbone.tokenize([f"{placeholder} {name}." for name in classnames])
        self.eot = backbone.text.eot_positions(tokens)
        if int(self.eot.max()) >= backbone.context_length:
            raise BackboneError(
                f"prompt.n_ctx={n_ctx} context tokens plus the longest class name exceed the "
                f"{backbone.context_length}-token text context"
            )
        length = int(self.eot.max()) + 1 if truncate and backbone.text.causal else backbone.context_length
        emb = backbone.token_embeddings(tokens)[:, :length]
        self.prefix = emb[:, :1]  # [C, 1, D]  SOS
        self.suffix = emb[:, 1 + n_ctx :]  # [C, L-1-M, D]  classname . EOS (and padding up to max_eot)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, C, L, D]``.

        ``ctx`` is ``[M, D]`` (one shared context), ``[C, M, D]`` (class-specific context) or
        ``[B, C|1, M, D]`` (a batch of prompt sets, e.g. one per client; 1 = shared over classes).
        """
        c = self.num_classes
        if ctx.dim() == 2:
            ctx = ctx[None, None]
        elif ctx.dim() == 3:
            if ctx.shape[0] != c:
                raise ValueError(f"class-specific context has {ctx.shape[0]} rows for {c} classes")
            ctx = ctx[None]
        if ctx.dim() != 4 or ctx.shape[-2] != self.n_ctx or ctx.shape[1] not in (1, c):
            raise ValueError(f"context of shape {tuple(ctx.shape)} does not fit {self.n_ctx} context tokens")
        b = ctx.shape[0]
        ctx = ctx.expand(b, c, self.n_ctx, ctx.shape[-1])
        pre = self.prefix[None].expand(b, -1, -1, -1)
        suf = self.suffix[None].expand(b, -1, -1, -1)
        return torch.cat([pre, ctx.to(device=pre.device, dtype=pre.dtype), suf], dim=2)

    def __call__(self, ctx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalised class text features ``[B, C, E]`` (see :meth:`embeddings` for shapes); ``params``
        runs the text tower on other weights for this call (see :class:`~pfpl.backbones.openclip.TextTower`)."""
        shared = self._shared_context(ctx)
        if shared is not None and not params and self.share_prefix:
            return self._prefix_shared(shared)
        x = self.embeddings(ctx)
        b, c = x.shape[:2]
        flat = x.reshape(b * c, *x.shape[2:])
        eot = self.eot.repeat(b)
        step = self.max_sequences
        out = [
            self.backbone.text_features_from_embeddings(flat[i : i + step], eot[i : i + step], self.truncate, params)
            for i in range(0, b * c, step)
        ]
        return torch.cat(out).reshape(b, c, -1)

    def _shared_context(self, ctx: torch.Tensor) -> torch.Tensor | None:
        """``[B, M, D]`` when each prompt set's context is the same for all its classes, else None."""
        if ctx.dim() == 2 and ctx.shape[0] == self.n_ctx:
            return ctx[None]
        if ctx.dim() == 4 and ctx.shape[1] == 1 and ctx.shape[2] == self.n_ctx:
            return ctx[:, 0]
        return None

    def _prefix_shared(self, ctx: torch.Tensor) -> torch.Tensor:
        b, c = ctx.shape[0], self.num_classes
        sos = self.prefix[:1]
        prefix = torch.cat([sos.expand(b, -1, -1), ctx.to(device=sos.device, dtype=sos.dtype)], dim=1)
        step = max(1, self.max_sequences // c)
        out = [
            prefix_tower.prefix_shared_features(self.backbone.text, prefix[i : i + step], self.suffix, self.eot)
            for i in range(0, b, step)
        ]
        return F.normalize(torch.cat(out).float(), dim=-1)
