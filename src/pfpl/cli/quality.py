"""``pfpl quality``: linear probe, zero-shot and centralised CoOp of a backbone on a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pfpl.cli.common import add_config_args, config_of
from pfpl.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="linear probe, zero-shot and centralised CoOp of a backbone on a dataset")
    add_config_args(p)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--coop-epochs", type=int, default=30)
    p.add_argument(
        "--update-manifest",
        action="store_true",
        help="write the figures into the embedded model's manifest (weights unchanged)",
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    if args.update_manifest and cfg.backbone.name != "embedded":
        raise ConfigError(
            f"--update-manifest writes the embedded model's manifest; backbone.name is "
            f"{cfg.backbone.name!r}, not 'embedded'"
        )
    from pfpl.backbones import load_backbone
    from pfpl.data import build_dataset
    from pfpl.evaluation.quality import measure_quality

    backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.device, str(cfg.cache_dir))
    result = measure_quality(
        backbone,
        build_dataset(cfg.data),
        cfg.cache_dir,
        shots=args.shots,
        n_ctx=cfg.prompt.n_ctx,
        seed=cfg.seed,
        template=cfg.prompt.template,
        coop_epochs=args.coop_epochs,
    )
    print(json.dumps(result, indent=None if args.json else 2))
    if args.update_manifest:
        from pfpl.backbones.embedded import load_manifest, record_quality

        folder = Path(cfg.backbone.pretrained) if cfg.backbone.pretrained else None
        print(f"wrote {record_quality(load_manifest(folder), result, 'pfpl quality --update-manifest', folder)}")
    return 0
