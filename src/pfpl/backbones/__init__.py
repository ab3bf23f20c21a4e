"""Frozen vision-language backbones (DESIGN §3): the open_clip adapter and the embedded tiny CLIP.

:func:`load_backbone` is the one factory every command, the engine and the benchmarks use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pfpl.backbones.embedded import EMBEDDED_NAME, VARIANTS, load_embedded
from pfpl.backbones.openclip import OpenClipBackbone, TextTower, load_open_clip
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.errors import BackboneError

__all__ = ["BackboneError", "OpenClipBackbone", "PromptTower", "TextTower", "load_backbone", "resolve_device"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("backbone.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def load_backbone(
    name: str = EMBEDDED_NAME,
    pretrained: str | None = None,
    device: str = "auto",
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> OpenClipBackbone:
    """The frozen backbone ``name``: 'embedded' (offline default), 'embedded-vit' (its ViT variant, which
    can carry vision prompts) or any open_clip model name.

    ``pretrained`` is a local checkpoint or an already-cached tag (open_clip models) or a folder of
    embedded weights; without it an open_clip model has random weights. ``image_size`` rebuilds the
    image tower for another input size; the embedded model then has random weights (its committed
    weights are for 64 px).
    """
    device = resolve_device(device)
    if name not in VARIANTS:
        return load_open_clip(name, pretrained, device, cache_dir, image_size)
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from pfpl.backbones.embedded import build_model

    if image_size is None:
        try:
            model, manifest = load_embedded(Path(pretrained) if pretrained else None, name)
        except FileNotFoundError as err:  # e.g. embedded-vit before its weights are pretrained
            raise BackboneError(str(err)) from None
        cfg, label = manifest["config"], name
    else:
        arch = VARIANTS[name]
        cfg = {**arch, "vision_cfg": {**arch["vision_cfg"], "image_size": image_size}}
        model, label = build_model(cfg), f"{name}:random"
    preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return OpenClipBackbone(model, label, preprocess, tokenizer, device)
