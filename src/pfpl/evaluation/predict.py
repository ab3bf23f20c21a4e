"""Classify images with a prompt artifact: the backbone it names (refused if its weights differ),
its context through the prompt tower (or the template's class texts, for a frozen-text method), its
vision prompts (if any) through the prompted image tower, top-k classes per image."""

from __future__ import annotations

from pathlib import Path

import torch

from pfpl.backbones import OpenClipBackbone, PromptTower, load_backbone
from pfpl.backbones.vision_tower import PromptedVision
from pfpl.errors import ArtifactError, BackboneError, DatasetError
from pfpl.prompts.artifact import PromptArtifact

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, and every image under the folders named (recursively, sorted)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif item.is_file():
            out.append(item)
        else:
            raise DatasetError(f"{item} does not exist")
    return out


def backbone_for(
    artifact: PromptArtifact, pretrained: str | None = None, device: str = "auto", cache_dir: str | None = None
) -> OpenClipBackbone:
    """The artifact's backbone (weights from ``pretrained``, else the path or tag it was trained with),
    refused when its weight fingerprint is not the one the prompt was trained on."""
    backbone = load_backbone(artifact.backbone, pretrained or artifact.backbone_pretrained, device, cache_dir)
    if backbone.fingerprint != artifact.backbone_fingerprint:
        raise ArtifactError(
            f"backbone {artifact.backbone} loaded with fingerprint {backbone.fingerprint}, but the prompt was trained "
            f"on weights with fingerprint {artifact.backbone_fingerprint}; pass the same weights with --pretrained"
        )
    return backbone


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None


def text_features(artifact: PromptArtifact, backbone: OpenClipBackbone) -> torch.Tensor:
    """``[C, E]`` the class text features the run classified with: the context through the prompt tower,
    or (a frozen-text method) the template's class texts."""
    if artifact.context is None:
        from pfpl.evaluation.zeroshot import zero_shot_text_features

        return zero_shot_text_features(backbone, artifact.classnames, artifact.template)
    if artifact.context.shape[-1] != backbone.ctx_dim:
        raise ArtifactError(f"the prompt's width {artifact.context.shape[-1]} is not the backbone's {backbone.ctx_dim}")
    tower = PromptTower(backbone, artifact.classnames, artifact.n_ctx)
    return tower(artifact.context.to(backbone.device))[0]


def prompted_vision(artifact: PromptArtifact, backbone: OpenClipBackbone) -> PromptedVision | None:
    """The image tower the run prompted, rebuilt from the artifact's vision fields (None: no vision prompts)."""
    if artifact.vision is None:
        return None
    depth, tokens, width = artifact.vision.shape
    try:
        vision = PromptedVision(backbone.model.visual, tokens, depth, artifact.vision_start)
    except BackboneError as exc:
        raise ArtifactError(f"the prompt's vision prompts do not fit backbone {artifact.backbone}: {exc}") from None
    if width != vision.width:
        raise ArtifactError(f"the prompt's vision prompt width {width} is not the image tower's {vision.width}")
    return vision


@torch.no_grad()
def classify(
    artifact: PromptArtifact, backbone: OpenClipBackbone, paths: list[Path], top_k: int = 1, batch_size: int = 64
) -> list[dict]:
    """Per image: its path and its ``top_k`` classes with probabilities (the backbone's logit scale)."""
    if not 1 <= top_k <= len(artifact.classnames):
        raise ArtifactError(f"--top-k {top_k} must be between 1 and the {len(artifact.classnames)} classes")
    text = text_features(artifact, backbone)  # [C, E]
    vision = prompted_vision(artifact, backbone)
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([backbone.preprocess(_open(p)) for p in chunk])
        if vision is None:
            features = backbone.encode_images(images)
        else:
            prompts = artifact.vision.to(backbone.device)
            features = vision.features(vision.fixed(images.to(backbone.device)), prompts)
        probs = (backbone.logit_scale * features @ text.t()).softmax(-1)
        top = probs.topk(top_k, dim=-1)
        for p, values, index in zip(chunk, top.values.tolist(), top.indices.tolist()):
            out.append(
                {
                    "image": str(p),
                    "top": [{"class": artifact.classnames[i], "probability": v} for v, i in zip(values, index)],
                }
            )
    return out
