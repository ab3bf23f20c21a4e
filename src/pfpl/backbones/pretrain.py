"""Contrastive pretraining of the embedded tiny CLIP on the shapes world (`pfpl pretrain-embedded`).

Reproducible from its seed: the images are a pure function of (seed, index), captions of
(seed, index, epoch), and model init and batch order come from seeded torch generators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from pfpl.backbones.embedded import EMBEDDED_CONFIG, build_model
from pfpl.backbones.openclip import TextTower
from pfpl.data import shapes

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 900,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup": 100,
    "images_per_class_domain": 200,
    "style_rate": 0.6,
    # None: train both towers from scratch; a variant name: start from that variant's pretrained text
    # tower (and logit scale), frozen, and train only the image tower against it
    "text_from": None,
}
#: the recipe of each variant, on top of PRETRAIN_DEFAULTS. A ViT image tower learns far slower than
#: the ResNet from scratch on 40,000 images (val zero-shot 0.35 after the ResNet's 900 steps, against
#: 0.92); aligned to the ResNet variant's frozen text tower it has a fixed target to learn, and both
#: variants then share one text side, so text-prompt results on them differ only by the image tower.
VARIANT_RECIPES: dict[str, dict[str, Any]] = {"embedded-vit": {"text_from": "embedded", "steps": 1800}}


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, H, W], as open_clip's eval transform does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    settings: dict[str, Any] | None = None,
    workers: int = 2,
    log: Callable[[str], None] = print,
    config: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train an embedded architecture (default: ``EMBEDDED_CONFIG``) from scratch; returns the model and
    its training record."""
    s = {**PRETRAIN_DEFAULTS, **(settings or {})}
    config = config or EMBEDDED_CONFIG
    torch.manual_seed(s["seed"])
    spec = shapes.WorldSpec(seed=s["seed"], image_size=config["vision_cfg"]["image_size"])
    labels, domains = shapes.sample_layout(s["images_per_class_domain"])
    t0 = time.time()
    images = shapes.render_parallel(spec, "pretrain", labels, domains, workers)
    log(f"rendered {len(images)} pretraining images in {time.time() - t0:.0f}s")

    # a small held-out monitor: zero-shot on the world's validation stream
    vl, vd = shapes.sample_layout(2)
    val_x = to_input(shapes.render_stream(spec, "val", vl, vd))
    val_y = torch.from_numpy(vl)

    model = build_model(config)
    frozen_text = s["text_from"] is not None
    if frozen_text:
        _take_text_tower(model, s["text_from"])
    text = TextTower.of(model)
    tokenizer = SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in trained if p.ndim < 2 or "logit_scale" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s["lr"],
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    gen = torch.Generator().manual_seed(s["seed"])
    n, bs = len(images), s["batch_size"]
    steps_per_epoch = n // bs
    history: list[dict[str, float]] = []
    order, tokens = None, None
    model.train()
    t0 = time.time()
    for step in range(s["steps"]):
        epoch, pos = divmod(step, steps_per_epoch)
        if pos == 0:
            order = torch.randperm(n, generator=gen)
            caps = [
                shapes.caption_item(spec, i, int(labels[i]), int(domains[i]), epoch, s["style_rate"]) for i in range(n)
            ]
            tokens = tokenizer(caps)
        idx = order[pos * bs : (pos + 1) * bs]
        x = to_input(images[idx.numpy()])
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        tok = tokens[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s["steps"], s["warmup"], s["lr"])
        img_f = F.normalize(model.encode_image(x), dim=-1)
        with torch.set_grad_enabled(not frozen_text):
            txt_f = F.normalize(text(text.token_embedding(tok), text.eot_positions(tok)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == s["steps"]:
            acc = _zero_shot(model, text, tokenizer, val_x, val_y)
            model.train()
            history.append({"step": step + 1, "loss": float(loss.detach()), "val_zero_shot": acc})
            log(
                f"step {step + 1}/{s['steps']}  loss {float(loss.detach()):.3f}  val zero-shot {acc:.3f}  "
                f"({time.time() - t0:.0f}s)"
            )
    record = {
        "settings": s,
        "wall_seconds": round(time.time() - t0, 1),
        "history": history,
        "world": {
            "seed": spec.seed,
            "image_size": spec.image_size,
            "render_version": shapes.RENDER_VERSION,
            "stream": "pretrain",
            "images": n,
            "classes": shapes.class_names(),
            "styles": list(shapes.STYLES),
        },
    }
    return model.eval(), record


def _take_text_tower(model: torch.nn.Module, variant: str) -> None:
    """Copy the pretrained text tower and logit scale of embedded ``variant`` into ``model`` and freeze
    them (everything outside ``visual.``)."""
    from pfpl.backbones.embedded import load_embedded

    donor, _ = load_embedded(name=variant)
    text_state = {k: v for k, v in donor.state_dict().items() if not k.startswith("visual.")}
    missing, unexpected = model.load_state_dict(text_state, strict=False)
    if unexpected or any(not k.startswith("visual.") for k in missing):
        raise ValueError(f"embedded {variant}'s text tower does not fit this architecture ({unexpected or missing})")
    for name, p in model.named_parameters():
        if not name.startswith("visual."):
            p.requires_grad_(False)


@torch.no_grad()
def _zero_shot(
    model: torch.nn.Module, text: TextTower, tokenizer: SimpleTokenizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    model.eval()
    # the captions' own colour words: this monitors alignment, not the benchmark's curated names
    tok = tokenizer([f"a photo of a {c}." for c in shapes.class_names("caption")])
    t = F.normalize(text(text.token_embedding(tok), text.eot_positions(tok)), dim=-1)
    f = F.normalize(model.encode_image(x), dim=-1)
    return float(((f @ t.t()).argmax(-1) == y).float().mean())
