"""Knowledge distillation of FedSP's auxiliary model from the full backbone, on the server's data
(DESIGN §8): MSE between the student's and the teacher's normalised image features and normalised
text features (class-name prompts and, where the dataset has them, captions). The student's
embeddings, norms and projections stay frozen; only its transformer blocks train."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pfpl.backbones.openclip import OpenClipBackbone


def _trainable(student: OpenClipBackbone) -> list[torch.nn.Parameter]:
    params = []
    holder = student.model.text if hasattr(student.model, "text") else student.model
    for module in (holder.transformer, getattr(student.model.visual, "transformer", None)):
        if module is not None:
            params += [p for p in module.parameters()]
    return params


def _features(
    backbone: OpenClipBackbone, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    text = backbone.text(backbone.text.token_embedding(tokens), backbone.text.eot_positions(tokens))
    image = backbone.model.encode_image(images)
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


@torch.no_grad()
def feature_mse(
    student: OpenClipBackbone, teacher: OpenClipBackbone, images: torch.Tensor, texts: list[str], batch: int = 256
) -> dict:
    """Mean squared error between the normalised features of student and teacher."""
    tokens = teacher.tokenize(texts)
    img, txt = 0.0, 0.0
    for i in range(0, len(images), batch):
        xs, _ = _features(student, images[i : i + batch].to(student.device), tokens[:1])
        xt, _ = _features(teacher, images[i : i + batch].to(teacher.device), tokens[:1])
        img += float(((xs - xt) ** 2).sum(-1).sum())
    for i in range(0, len(tokens), batch):
        _, ts = _features(student, images[:1].to(student.device), tokens[i : i + batch])
        _, tt = _features(teacher, images[:1].to(teacher.device), tokens[i : i + batch])
        txt += float(((ts - tt) ** 2).sum(-1).sum())
    return {"image_mse": img / max(1, len(images)), "text_mse": txt / max(1, len(tokens))}


def distill(
    student: OpenClipBackbone,
    teacher: OpenClipBackbone,
    images: torch.Tensor,
    texts: list[str],
    steps: int = 300,
    lr: float = 1e-3,
    batch: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train the student's transformer blocks for ``steps`` AdamW steps (cosine schedule); returns the
    feature MSE before and after and the time it took."""
    say = log or (lambda message: None)
    before = feature_mse(student, teacher, images, texts)
    params = _trainable(student)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    tokens = teacher.tokenize(texts)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / max(1, steps)))
        xi = images[torch.randint(len(images), (min(batch, len(images)),), generator=gen)].to(student.device)
        ti = tokens[torch.randint(len(tokens), (min(batch, len(tokens)),), generator=gen)].to(student.device)
        with torch.no_grad():
            img_t, txt_t = _features(teacher, xi, ti)
        img_s, txt_s = _features(student, xi, ti)
        loss = ((img_s - img_t) ** 2).sum(-1).mean() + ((txt_s - txt_t) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            say(f"distillation step {step + 1}/{steps}: loss {loss.item():.4f}")
    student.model.requires_grad_(False)
    after = feature_mse(student, teacher, images, texts)
    return {
        "before": before,
        "after": after,
        "steps": steps,
        "lr": lr,
        "seconds": round(time.perf_counter() - start, 1),
        "images": len(images),
        "texts": len(texts),
    }
