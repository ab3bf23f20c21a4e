"""Accuracy overall and per domain, the figures every evaluation reports."""

from __future__ import annotations

import torch


def accuracy_report(pred: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, domainnames: list[str]) -> dict:
    """``{"accuracy": …, "per_domain": {name: …}}``; domains with no samples are left out."""
    correct = (pred == labels).float()
    per_domain = {
        name: float(correct[domains == d].mean()) for d, name in enumerate(domainnames) if bool((domains == d).any())
    }
    return {"accuracy": float(correct.mean()) if len(correct) else float("nan"), "per_domain": per_domain}


def logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP logits: scaled cosine similarity of normalised image and class text features."""
    return scale * image_features @ text_features.t()
