"""Patch-level features of the frozen image tower (FedOTP's optimal transport aligns prompts with them).

One function, apart from the pooled :meth:`~pfpl.backbones.openclip.OpenClipBackbone.encode_images`:

- a **ViT** (open_clip ``VisionTransformer``): every patch token after ``ln_post``, through the
  projection the pooled token takes (``proj``);
- a **ModifiedResNet** (CLIP's RN50 family and the embedded model): the attention pool run with every
  spatial position as a query, as FedOTP's CLIP does for its ResNets — position i's output is what the
  pool would give if it pooled at i (the mean token's output is the usual pooled feature).

Each patch feature is L2-normalised, like the pooled one. :class:`PatchEncoder` wraps a backbone so the
feature cache (:func:`pfpl.data.features.image_features`) stores them (flattened, ``[N, P·E]``) under
their own key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfpl.errors import BackboneError


def _resnet_patches(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = visual.stem(images)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    pool = visual.attnpool
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (HW) N C
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return out[1:].permute(1, 0, 2)  # N P E


def _vit_patches(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = before
    return tokens @ visual.proj if visual.proj is not None else tokens


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[N, P, E]`` normalised patch features of ``images`` from an open_clip CLIP's image tower."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if isinstance(visual, ModifiedResNet) and getattr(visual, "attnpool", None) is not None:
        out = _resnet_patches(visual, images)
    elif isinstance(visual, VisionTransformer):
        out = _vit_patches(visual, images)
    else:
        raise BackboneError(f"no patch features for an image tower of type {type(visual).__name__}")
    return F.normalize(out.float(), dim=-1)


class PatchEncoder:
    """A backbone seen as an encoder of flattened patch features, for the feature cache."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.fingerprint = f"{backbone.fingerprint}|patches"
        self.preprocess = backbone.preprocess
        self.preprocess_id = backbone.preprocess_id

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return patch_features(b.model, images.to(b.device)).flatten(1)
