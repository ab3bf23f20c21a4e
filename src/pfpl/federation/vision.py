"""Vision prompts in a run (issue 30): the prompted image tower, the cached prompt-free tokens of each
split, and evaluation where each client's image features are functions of its own vision prompts."""

from __future__ import annotations

import torch

from pfpl.algorithms import prompts_vision
from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.backbones.vision_tower import FixedTokens, PromptedVision
from pfpl.config import Config
from pfpl.data.features import Features, image_features
from pfpl.evaluation.federated import EvalPlan, client_scores


def vision_methods(cfg: Config) -> list[str]:
    """The run's methods whose image features depend on their prompts."""
    return [m for m in cfg.train.methods if prompts_vision(m, cfg.prompt.modality)]


def build_vision(cfg: Config, backbone: OpenClipBackbone) -> PromptedVision:
    """The prompted image tower of the backbone, shaped by ``prompt.vision_*`` (an error for a ResNet)."""
    p = cfg.prompt
    return PromptedVision(backbone.model.visual, p.vision_tokens, p.vision_depth, p.vision_start, cfg.train.max_images)


def split_tokens(vision: PromptedVision, backbone: OpenClipBackbone, dataset, split: str, cache_dir) -> torch.Tensor:
    """``[N, T, W]`` the prompt-free tokens of a split, row for row with its cached image features."""
    flat = image_features(FixedTokens(backbone, vision), dataset, split, cache_dir).features
    return flat.view(len(flat), -1, vision.width)


@torch.no_grad()
def vision_scores(
    text: torch.Tensor,
    prompts: torch.Tensor,
    clients: list[int],
    test: Features,
    tokens: torch.Tensor,
    plan: EvalPlan,
    vision: PromptedVision,
) -> dict[str, list[float]]:
    """Each of ``clients``' accuracies with its row of the class text features ``[B, C, E]`` (or ``[C, E]``
    shared) and of the vision prompts ``[B, depth, P, W]``: what a party computes for the clients it
    hosts (the test images' features computed once per distinct prompt set in a row)."""
    text = text.expand(len(clients), *text.shape[-2:]) if text.dim() == 2 else text
    per_client: dict[str, list[float]] = {}
    feats, last = None, None
    for row, client in enumerate(clients):
        if last is None or not torch.equal(prompts[row], last):
            last = prompts[row]
            feats = vision.features(tokens.to(last.device), last)
        scores = client_scores(text[row : row + 1], [client], Features(feats, test.labels, test.domains), plan)
        for key, values in scores.items():
            per_client.setdefault(key, []).extend(values)
    return per_client
