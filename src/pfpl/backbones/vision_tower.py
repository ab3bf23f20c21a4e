"""Vision prompts in an open_clip ViT image tower (VPT, IVLP, MaPLe).

P learnable tokens sit right after the class token of the patch sequence. *Shallow* prompts enter
once, at layer ``start`` (at the input, through the tower's ``ln_pre`` like the patch tokens, when
``start = 0``); *deep* prompts replace those P positions with fresh tokens before each of the next
``depth - 1`` layers. The prompt tokens' outputs are dropped before pooling, so the image feature is
the tower's own pooled class token (or patch mean) over a sequence that attended to the prompts.

What does not depend on the prompts is computed once per image and cached (:meth:`fixed`): the
patch embeddings with the class token, positions and ``ln_pre``, run through the ``start`` layers
below the first prompted one. Each step runs only the layers from ``start`` up, for every client's
records at once (one prompt set per client, or per record for per-record gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfpl.errors import BackboneError


def supports(visual: nn.Module) -> bool:
    """Whether ``visual`` is an open_clip ViT that can carry prompt tokens (not a ResNet, no attentional
    pooler, which reads every token)."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return (
        blocks is not None
        and hasattr(visual, "class_embedding")
        and hasattr(visual, "_embeds")
        and hasattr(visual, "_pool")
        and getattr(visual, "attn_pool", None) is None
    )


class PromptedVision:
    """The image tower of a frozen open_clip ViT with P prompt tokens in layers ``start`` … ``start + depth - 1``."""

    def __init__(self, visual: nn.Module, n_tokens: int, depth: int = 1, start: int = 0, max_images: int = 4096):
        if not supports(visual):
            raise BackboneError(
                f"the image tower ({type(visual).__name__}) is not a ViT and cannot carry vision prompts; "
                "use a ViT backbone (an open_clip ViT-*, or backbone.name = 'embedded-vit')"
            )
        layers = len(visual.transformer.resblocks)
        if n_tokens < 1:
            raise BackboneError(f"prompt.vision_tokens = {n_tokens}: a vision prompt needs at least one token")
        if not 0 <= start < layers or not 1 <= depth <= layers - start:
            raise BackboneError(
                f"vision prompts in layers {start}…{start + depth - 1} do not fit the image tower's {layers} layers "
                "(prompt.vision_start + prompt.vision_depth must be at most the number of layers)"
            )
        self.visual, self.n_tokens, self.depth, self.start = visual, n_tokens, depth, start
        self.max_images = max_images  # memory budget: images a training call runs through the prompted layers
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    @property
    def width(self) -> int:
        """The dimension of one prompt token (the tower's width)."""
        return int(self.visual.class_embedding.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """One prompt set: ``(depth, n_tokens, width)``."""
        return (self.depth, self.n_tokens, self.width)

    def _run(self, blocks, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in blocks:
            x = blk(x)
        return x if self.batch_first else x.transpose(0, 1)

    @torch.no_grad()
    def fixed(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, T, W]``: what the prompts cannot change, for preprocessed images ``[N, 3, H, W]``."""
        x = self.visual._embeds(images)
        return self._run(self.blocks[: self.start], x).float()

    def __call__(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Normalised image features ``[B, n, E]``.

        ``tokens``: ``[B, n, T, W]`` cached :meth:`fixed` outputs (n records of each of B clients);
        ``prompts``: ``[B, depth, P, W]`` one prompt set per client, or ``[B, n, depth, P, W]`` one per
        record (per-record gradients).
        """
        b, n, t, w = tokens.shape
        p = self.n_tokens
        if prompts.dim() == 4:
            prompts = prompts[:, None].expand(b, n, *prompts.shape[1:])
        if tuple(prompts.shape) != (b, n, *self.shape):
            raise ValueError(f"vision prompts of shape {tuple(prompts.shape)} for {b} × {n} records of {self.shape}")
        prompts = prompts.reshape(b * n, *self.shape).to(tokens.dtype)
        first = prompts[:, 0]
        if self.start == 0:
            first = self.visual.ln_pre(first)  # as the patch tokens entered the tower
        x = tokens.reshape(b * n, t, w)
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)
        for i, blk in enumerate(self.blocks[self.start :]):
            if 0 < i < self.depth:  # deep prompts: fresh tokens in place of the last layer's
                x = torch.cat([x[:, :1], prompts[:, i], x[:, 1 + p :]], dim=1)
            x = self._run([blk], x)
        x = torch.cat([x[:, :1], x[:, 1 + p :]], dim=1)  # the prompts' outputs are not pooled
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return F.normalize(pooled.float(), dim=-1).reshape(b, n, -1)

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` image features of ``tokens`` ``[N, T, W]`` under one prompt set ``[depth, P, W]``, in
        chunks of the image budget (what a run's evaluation and ``pfpl predict`` both compute)."""
        step = max(1, self.max_images)
        return torch.cat([self(tokens[i : i + step][None], prompts[None])[0] for i in range(0, len(tokens), step)])


class FixedTokens:
    """:meth:`PromptedVision.fixed` as an image encoder for the feature cache
    (:func:`pfpl.data.features.image_features`): its "features" are each image's flattened
    ``[T, W]`` prompt-free tokens, cached under their own key (the backbone and the first prompted layer)."""

    def __init__(self, backbone, vision: PromptedVision):
        self.backbone, self.vision = backbone, vision
        self.fingerprint = f"{backbone.fingerprint}|vision-tokens-below-layer-{vision.start}"
        self.preprocess_id = backbone.preprocess_id
        self.preprocess = backbone.preprocess

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision.fixed(images.to(self.backbone.device)).flatten(1)
