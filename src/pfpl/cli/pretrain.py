"""``pfpl pretrain-embedded``: re-create the embedded tiny CLIP from its seed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain-embedded", help="pretrain the embedded tiny CLIP on the shapes world")
    p.add_argument("--out", type=Path, help="output folder (default: the package's assets folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (default from the recipe)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--no-quality", action="store_true", help="skip measuring quality into the manifest")
    p.add_argument(
        "--variant",
        default="embedded",
        choices=["embedded", "embedded-vit"],
        help="embedded (ResNet image tower, the default) or embedded-vit (a ViT that can carry vision prompts)",
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    import sys

    from pfpl.backbones import load_backbone
    from pfpl.backbones.embedded import VARIANTS, assets_dir, record_quality, save_embedded
    from pfpl.backbones.pretrain import VARIANT_RECIPES, pretrain
    from pfpl.config import Config
    from pfpl.data import build_dataset

    out = args.out or assets_dir()
    settings = {**VARIANT_RECIPES.get(args.variant, {}), "seed": args.seed}
    if args.steps:
        settings["steps"] = args.steps
    model, record = pretrain(
        settings,
        workers=args.workers,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        config=VARIANTS[args.variant],
    )
    flags = (f" --seed {args.seed}" if args.seed else "") + (
        f" --variant {args.variant}" if args.variant != "embedded" else ""
    )
    manifest = {
        "name": args.variant,
        "config": VARIANTS[args.variant],
        "pretraining": record,
        "command": "pfpl pretrain-embedded" + flags,
    }
    save_embedded(model, manifest, out)
    if not args.no_quality:
        from pfpl.evaluation.quality import measure_quality

        cfg = Config()
        backbone = load_backbone(args.variant, str(out), "cpu")
        quality = measure_quality(backbone, build_dataset(cfg.data), cfg.cache_dir, template=cfg.prompt.template)
        record_quality(manifest, quality, "pfpl quality", out)  # the weights are already written
    print(json.dumps({k: manifest.get(k) for k in ("quality",)}, indent=2))
    print(f"wrote {out}")
    return 0
