"""CoOp: one learned context ``[M, D]`` in front of every class name, trained with cross-entropy on
cached image features (Zhou et al., IJCV 2022). Centralised; the federated methods build on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.features import Features
from pfpl.errors import ConfigError


def init_context(
    n_ctx: int, dim: int, std: float, generator: torch.Generator, batch: tuple[int, ...] = ()
) -> torch.Tensor:
    """Random N(0, std²) context vectors, as CoOp's random initialisation."""
    return torch.randn(*batch, n_ctx, dim, generator=generator) * std


def phrase_context(backbone: OpenClipBackbone, phrase: str, n_ctx: int) -> torch.Tensor:
    """``[n_ctx, D]``: the token embeddings of ``phrase`` (CoOp's ctx_init). With the template
    ``"<phrase> {}."`` a prompt starting here gives exactly the zero-shot class texts."""
    tokens = backbone.tokenize([phrase])
    length = int(backbone.text.eot_positions(tokens)[0]) - 1  # tokens between SOS and EOT
    if length != n_ctx:
        raise ConfigError(
            f"config error: prompt.init = {phrase!r} is {length} tokens for this backbone's tokenizer, not "
            f"prompt.n_ctx = {n_ctx}; set prompt.n_ctx = {length} or choose a phrase of one token per word"
        )
    return backbone.token_embeddings(tokens)[0, 1 : 1 + length].cpu()


def fit_coop(
    tower: PromptTower,
    train: Features,
    scale: float,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.002,
    momentum: float = 0.9,
    init_std: float = 0.02,
    seed: int = 0,
) -> torch.Tensor:
    """Train a unified CoOp context with SGD + cosine schedule; returns the context ``[M, D]``."""
    gen = torch.Generator().manual_seed(seed)
    device = tower.backbone.device
    ctx = init_context(tower.n_ctx, tower.backbone.ctx_dim, init_std, gen).to(device).requires_grad_(True)
    train = train.to(device)
    opt = torch.optim.SGD([ctx], lr=lr, momentum=momentum)
    n = len(train)
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(device)
            text = tower(ctx)[0]
            loss = F.cross_entropy(scale * train.features[idx] @ text.t(), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return ctx.detach()


def few_shot(feats: Features, shots: int, seed: int) -> Features:
    """``shots`` samples per class, drawn with ``seed`` (all of a class if it has fewer)."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in feats.labels.unique().tolist():
        idx = (feats.labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return feats.subset(torch.cat(keep).sort().values)
