"""Zero-shot classification with a hand-crafted template, over cached image features."""

from __future__ import annotations

import torch

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.data.features import Features
from pfpl.evaluation.metrics import accuracy_report


@torch.no_grad()
def zero_shot_text_features(backbone: OpenClipBackbone, classnames: list[str], template: str) -> torch.Tensor:
    return backbone.encode_text([template.format(name) for name in classnames])


@torch.no_grad()
def zero_shot(
    backbone: OpenClipBackbone,
    feats: Features,
    classnames: list[str],
    domainnames: list[str],
    template: str = "a photo of a {}.",
) -> dict:
    """``{"accuracy": …, "per_domain": {…}}`` of the template's class texts as classifier."""
    text = zero_shot_text_features(backbone, classnames, template)
    pred = (feats.features.to(text.device) @ text.t()).argmax(-1).to(feats.labels.device)
    return accuracy_report(pred, feats.labels, feats.domains, domainnames)
