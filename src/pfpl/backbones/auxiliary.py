"""FedSP's auxiliary model (DESIGN §8): a compact CLIP of the same family as a backbone, which
clients receive instead of the backbone itself.

It keeps the token, position and patch embeddings, the final norms and the projections, and
replaces each *transformer* tower's blocks with fewer: ``shared`` — the first ``layers`` blocks
repeated to the tower's full depth (the published code's cross-layer weight sharing, one block by
default) — or ``truncate`` — the first ``layers`` blocks only. It reads the same token embeddings,
so a prompt moves between it and the backbone without any mapping. An image tower that is not a
transformer (the embedded model's ResNet) is kept whole: it has no repeated blocks to share.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.errors import BackboneError

MODES = ("shared", "truncate")


def _compact(blocks: nn.ModuleList, mode: str, layers: int) -> nn.ModuleList:
    depth = len(blocks)
    if not 1 <= layers <= depth:
        raise BackboneError(f"fedsp.layers={layers} must be between 1 and the tower's depth ({depth})")
    if mode == "shared":  # the first ``layers`` blocks, cycled to full depth (weights shared)
        return nn.ModuleList([blocks[i % layers] for i in range(depth)])
    return nn.ModuleList(list(blocks[:layers]))


def auxiliary_backbone(backbone: OpenClipBackbone, mode: str = "shared", layers: int = 1) -> OpenClipBackbone:
    """A compact copy of ``backbone`` (its weights are copied, never shared with it)."""
    if mode not in MODES:
        raise BackboneError(f"fedsp.auxiliary={mode!r} is not one of {', '.join(MODES)}")
    model = copy.deepcopy(backbone.model).cpu()
    holder = model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model
    holder.transformer.resblocks = _compact(holder.transformer.resblocks, mode, layers)
    if hasattr(holder.transformer, "layers"):
        holder.transformer.layers = len(holder.transformer.resblocks)
    visual = getattr(model.visual, "transformer", None)
    if visual is not None and hasattr(visual, "resblocks"):
        visual.resblocks = _compact(visual.resblocks, mode, layers)
        if hasattr(visual, "layers"):
            visual.layers = len(visual.resblocks)
    name = f"{backbone.name}:aux-{mode}-{layers}"
    return OpenClipBackbone(model, name, backbone.preprocess, backbone.tokenizer, str(backbone.device))


def _unique(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields shared tensors once


def parameter_report(full: OpenClipBackbone, aux: OpenClipBackbone) -> dict:
    """Parameters of each model, overall and in its transformer blocks (shared weights counted once)."""

    def transformers(model: nn.Module) -> int:
        holder = model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model
        total = _unique(holder.transformer)
        visual = getattr(model.visual, "transformer", None)
        return total + (_unique(visual) if visual is not None else 0)

    out = {
        "full_parameters": _unique(full.model),
        "auxiliary_parameters": _unique(aux.model),
        "full_transformer_parameters": transformers(full.model),
        "auxiliary_transformer_parameters": transformers(aux.model),
    }
    out["auxiliary_share"] = out["auxiliary_parameters"] / out["full_parameters"]
    out["auxiliary_transformer_share"] = out["auxiliary_transformer_parameters"] / out["full_transformer_parameters"]
    return out


def text_body(aux: OpenClipBackbone) -> dict[str, torch.Tensor]:
    """The auxiliary text body's unique trainable weights, keyed for ``torch.func.functional_call`` on
    the backbone's :class:`~pfpl.backbones.openclip.TextTower`."""
    return {k: v.detach().clone() for k, v in aux.text.named_parameters() if k.startswith("transformer.")}
