"""Quality of a backbone on a dataset: linear probe, zero-shot and centralised CoOp, overall and
per domain. These are the figures the embedded model's manifest and docs/embedded.md record."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.base import VisionDataset
from pfpl.data.features import image_features
from pfpl.evaluation.metrics import accuracy_report
from pfpl.evaluation.probe import linear_probe
from pfpl.evaluation.zeroshot import zero_shot
from pfpl.prompts.coop import few_shot, fit_coop


def measure_quality(
    backbone: OpenClipBackbone,
    dataset: VisionDataset,
    cache_dir: Path | None,
    shots: int = 16,
    n_ctx: int = 16,
    seed: int = 0,
    template: str = "a photo of a {}.",
    coop_epochs: int = 30,
    coop_lrs: tuple[float, ...] = (0.002, 0.02, 0.2),
    log: Callable[[str], None] | None = None,
) -> dict:
    """``log`` hears about each stage as it starts (the whole takes seconds to minutes)."""
    t0 = time.time()
    say = log or (lambda message: None)
    say("image features of train, val and test (computed once, then cached)")
    train, val, test = (image_features(backbone, dataset, s, cache_dir) for s in ("train", "val", "test"))
    names, domains = dataset.classnames, dataset.domainnames
    say(f"linear probe on {len(train)} training images")
    probe = linear_probe(train, val, test, len(names))
    zs = zero_shot(backbone, test, names, domains, template)
    tower = PromptTower(backbone, names, n_ctx)
    shots_set = few_shot(train, shots, seed)
    best = None  # the learning rate is chosen on the validation split, never on test
    for lr in coop_lrs:
        say(f"centralised CoOp, {shots} shots, lr {lr:g} ({coop_epochs} epochs; {time.time() - t0:.0f} s so far)")
        ctx = fit_coop(tower, shots_set, backbone.logit_scale, epochs=coop_epochs, lr=lr, seed=seed)
        with torch.no_grad():
            val_acc = float(
                ((val.features.to(ctx.device) @ tower(ctx)[0].t()).argmax(-1).cpu() == val.labels).float().mean()
            )
        if best is None or val_acc > best[0]:
            best = (val_acc, lr, ctx)
    val_acc, coop_lr, ctx = best
    with torch.no_grad():
        coop_pred = (test.features.to(ctx.device) @ tower(ctx)[0].t()).argmax(-1).cpu()
    return {
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "class_names": list(names),
        "test_images": len(test),
        "linear_probe": accuracy_report(probe["pred"], test.labels, test.domains, domains) | {"l2": probe["l2"]},
        "zero_shot": zs | {"template": template},
        "coop": accuracy_report(coop_pred, test.labels, test.domains, domains)
        | {
            "shots": shots,
            "n_ctx": n_ctx,
            "epochs": coop_epochs,
            "lr": coop_lr,
            "lr_grid": list(coop_lrs),
            "val_accuracy": val_acc,
            "seed": seed,
        },
        "seconds": round(time.time() - t0, 1),
    }
