"""The clip norm from measured per-record gradient norms (``dp.clip_quantile``).

A clip far below every record's gradient norm turns DP-SGD into normalised SGD (the clip then only
scales the step, like the learning rate); one far above adds noise for nothing. pfpl measures the
norms the mechanism will clip — feature mode: each record's gradient w.r.t. the class text features
(closed form); per-sample mode: w.r.t. the context, of which every method's private leaves are a
linear image — on the **val split**, at the initial prompt, and takes a quantile. The val split is
not training data, so the choice costs the training records nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: records measured at most (a deterministic, evenly spaced subset of a larger split)
MAX_RECORDS = 256


def record_gradient_norms(
    tower, ctx: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, scale: float, space: str
) -> torch.Tensor:
    """``[n]`` per-record cross-entropy gradient norms at context ``ctx`` (``[M, D]`` or ``[C, M, D]``),
    w.r.t. the class text features (``space = "feature"``) or the context (``"context"``)."""
    if len(features) > MAX_RECORDS:
        keep = torch.linspace(0, len(features) - 1, MAX_RECORDS).round().long()
        features, labels = features[keep], labels[keep]
    device = tower.backbone.device
    features, labels = features.to(device), labels.to(device)
    ctx = ctx.detach().to(device).requires_grad_(space == "context")
    with torch.set_grad_enabled(space == "context"):
        text = tower(ctx if ctx.dim() == 3 else ctx[None, None])[0]  # [C, E]
        logits = scale * features @ text.t()
        err = (torch.softmax(logits, -1) - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)).detach()
        if space == "feature":
            return scale * err.norm(dim=-1) * features.norm(dim=-1)
        cotangents = scale * torch.einsum("nc,ne->nce", err, features)
        (grads,) = torch.autograd.grad(text, [ctx], cotangents, is_grads_batched=True)
    return grads.flatten(1).norm(dim=1).detach()


def quantile_clip(norms: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``norms`` as a clip norm (positive)."""
    value = float(torch.quantile(norms.double().cpu(), quantile))
    if not value > 0:
        raise ValueError(f"the measured gradient norms' {quantile:g} quantile is {value:g}; set dp.clip instead")
    return value
