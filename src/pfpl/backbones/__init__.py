"""Frozen vision-language backbones (DESIGN §3): the open_clip adapter and the embedded tiny CLIP."""

from __future__ import annotations

import torch

from pfpl.backbones.embedded import EMBEDDED_NAME, load_embedded
from pfpl.backbones.openclip import BackboneError, OpenClipBackbone, load_open_clip
from pfpl.backbones.prompt_tower import PromptTower

__all__ = ["BackboneError", "OpenClipBackbone", "PromptTower", "load_backbone", "resolve_device"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("backbone.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def load_backbone(name: str = EMBEDDED_NAME, pretrained: str | None = None, device: str = "auto",
                  cache_dir: str | None = None) -> OpenClipBackbone:
    """The frozen backbone ``name``: 'embedded' (offline default) or any open_clip model name."""
    device = resolve_device(device)
    if name == EMBEDDED_NAME:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        from pathlib import Path

        model, manifest = load_embedded(Path(pretrained) if pretrained else None)
        cfg = manifest["config"]
        preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
        tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        return OpenClipBackbone(model, EMBEDDED_NAME, preprocess, tokenizer, device)
    return load_open_clip(name, pretrained, device, cache_dir)
