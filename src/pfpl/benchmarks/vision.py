"""``pfpl bench --vision``: the cost of a vision-prompt round against a text-prompt round.

DP-FPL with step sync on the embedded ViT architecture (random weights: timings do not depend on
them), the same clients, records and steps, with ``prompt.modality`` = text, vision and both. A
text round runs the text tower on cached image features; a vision round runs the prompted image
layers on every batch's cached prompt-free tokens (and the text classifier is the frozen template);
both runs both. Each row runs in its own process, so its peak resident memory is its own; the last
row repeats the largest client count of a vision round with a small image budget
(``train.max_images``), to show that the budget bounds memory at 100 clients.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from pfpl.benchmarks.scaling import _peak_rss_mib, _rss_mib, in_child

CLIENTS = (10, 100)
CLASSES = 40
CLASSES_PER_CLIENT = 4
RECORDS_PER_CLIENT = 64
BATCH_SIZE = 32
STEPS = 1
REPEATS = 2
MODALITIES = ("text", "vision", "both")
SMALL_BUDGET = 256  # images through the prompted layers at once: 8 clients of batch 32 per call


def measure(
    n: int, modality: str, max_images: int, steps: int = STEPS, repeats: int = REPEATS, device: str = "auto"
) -> dict:
    """One row, in this process: ``n`` clients of DP-FPL on ``modality``, one warm-up round, ``repeats``
    timed rounds; memory before training and at its peak."""
    import numpy as np
    import torch

    from pfpl.backbones import PromptTower, load_backbone
    from pfpl.backbones.embedded import EMBEDDED_VIT_NAME
    from pfpl.benchmarks.flops import timed
    from pfpl.config import load_config
    from pfpl.data.clients import ClientData
    from pfpl.data.features import Features
    from pfpl.federation.client import TrainSettings
    from pfpl.federation.vision import build_vision
    from pfpl.federation.wiring import build_engine

    cfg = load_config(
        None,
        [
            "train.methods=['dpfpl']",
            f"prompt.modality={modality}",
            f"train.max_images={max_images}",
            f"federation.n_clients={n}",
        ],
    )
    backbone = load_backbone(EMBEDDED_VIT_NAME, None, device, image_size=64)
    gen = torch.Generator().manual_seed(0)
    total = n * RECORDS_PER_CLIENT
    labels = torch.cat([torch.arange(CLASSES_PER_CLIENT) + CLASSES_PER_CLIENT * (c % (CLASSES // 4)) for c in range(n)])
    labels = labels.repeat_interleave(RECORDS_PER_CLIENT // CLASSES_PER_CLIENT)
    names = [f"object {i}" for i in range(CLASSES)]
    tower = PromptTower(backbone, names, cfg.prompt.n_ctx, max_sequences=cfg.train.max_sequences)
    vision = build_vision(cfg, backbone)
    tokens, feats = [], []
    for i in range(0, total, 512):  # random images: the compute does not depend on what they show
        images = torch.randn(min(512, total - i), 3, 64, 64, generator=gen).to(backbone.device)
        tokens.append(vision.fixed(images))
        feats.append(backbone.encode_images(images))
    train = Features(torch.cat(feats), labels, torch.zeros(total, dtype=torch.long))
    clients = [np.arange(c * RECORDS_PER_CLIENT, (c + 1) * RECORDS_PER_CLIENT) for c in range(n)]
    if modality != "text":
        tower.vision = vision
    data = ClientData(train, clients, backbone.device, tokens=torch.cat(tokens) if modality != "text" else None)
    settings = TrainSettings(rounds=1, local_steps=steps, batch_size=BATCH_SIZE, sync="step", cosine=False)
    sim, _ = build_engine(cfg, "dpfpl", tower, data, backbone.logit_scale, settings=settings)
    cuda = backbone.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(backbone.device)
    before = _rss_mib()
    sim.run_round()  # warm-up
    seconds = [timed(sim.run_round, backbone.device) for _ in range(repeats)]
    s_round = statistics.median(seconds)
    return {
        "clients": n,
        "modality": modality,
        "max_images": max_images,
        "clients_per_call": sim.clients_per_call,
        "s_per_round": s_round,
        "ms_per_client_step": 1e3 * s_round / (n * steps),
        "rss_before_training_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
        "training_rss_increase_mib": _peak_rss_mib() - before,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(backbone.device) / 2**20 if cuda else None,
        "samples_s": seconds,
        "device": str(backbone.device),
        "threads": torch.get_num_threads(),
    }


def _in_child(args: list) -> dict:
    return in_child("vision", args, f"vision-bench row {args}")


def run_vision_bench(
    clients: Sequence[int] = CLIENTS,
    steps: int = STEPS,
    repeats: int = REPEATS,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict:
    say = log or (lambda message: None)
    from pfpl.config import TrainConfig

    budget = TrainConfig().max_images
    plan = [(n, m, budget) for n in clients for m in MODALITIES] + [(max(clients), "vision", SMALL_BUDGET)]
    rows = []
    for n, modality, images in plan:
        say(f"{n} clients, {modality} prompts, image budget {images}")
        rows.append(_in_child([n, modality, images, steps, repeats, device]))
    text = {r["clients"]: r["s_per_round"] for r in rows if r["modality"] == "text"}
    for r in rows:
        r["ratio_to_text"] = r["s_per_round"] / text[r["clients"]]
    return {
        "rows": rows,
        "workload": {
            "backbone": "embedded-vit (random weights)",
            "method": "dpfpl",
            "sync": "step",
            "classes": CLASSES,
            "classes_per_client": CLASSES_PER_CLIENT,
            "records_per_client": RECORDS_PER_CLIENT,
            "batch_size": BATCH_SIZE,
            "steps": steps,
            "repeats": repeats,
            "device": rows[0]["device"],
            "threads": rows[0]["threads"],
        },
    }


def format_vision(result: dict) -> str:
    wl = result["workload"]
    lines = [
        f"pfpl bench --vision — {wl['backbone']}, {wl['method']} ({wl['sync']} sync), {wl['classes_per_client']} of "
        f"{wl['classes']} classes and {wl['records_per_client']} records per client, batch {wl['batch_size']}, "
        f"{wl['steps']} steps per round, median of {wl['repeats']}; {wl['device']}, {wl['threads']} thread(s)",
        f"{'clients':>7} {'prompts':>7} {'images':>7} {'clients/call':>12} {'s/round':>8} {'× text':>7} "
        f"{'ms/client-step':>14} {'peak RSS MiB':>12} {'training +MiB':>13}",
    ]
    for r in result["rows"]:
        ratio = r["ratio_to_text"]
        lines.append(
            f"{r['clients']:>7} {r['modality']:>7} {r['max_images']:>7} {r['clients_per_call']:>12} "
            f"{r['s_per_round']:>8.3f} {ratio:>7.2f} {r['ms_per_client_step']:>14.2f} {r['peak_rss_mib']:>12.0f} "
            f"{r['training_rss_increase_mib']:>13.0f}"
        )
    lines.append("× text: this row's seconds per round over the text-prompt round's at the same client count")
    return "\n".join(lines)
