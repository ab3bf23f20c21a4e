"""``pfpl quality``: linear probe, zero-shot and centralised CoOp of a backbone on a dataset."""

from __future__ import annotations

import argparse
import json
import sys
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
    log = (lambda message: print(f"[quality] {message}", file=sys.stderr, flush=True)) if not args.json else None
    result = measure_quality(
        backbone,
        build_dataset(cfg.data),
        cfg.cache_dir,
        shots=args.shots,
        n_ctx=cfg.prompt.n_ctx,
        seed=cfg.seed,
        template=cfg.prompt.template,
        coop_epochs=args.coop_epochs,
        log=log,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print_quality(result)
    if args.update_manifest:
        from pfpl.backbones.embedded import load_manifest, record_quality

        folder = Path(cfg.backbone.pretrained) if cfg.backbone.pretrained else None
        written = record_quality(load_manifest(folder), result, "pfpl quality --update-manifest", folder)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def print_quality(result: dict) -> None:
    where = f"{result['backbone']} on {result['dataset']}"
    print(f"{where} (test, {result['test_images']} images, {result['seconds']:.0f} s):")
    coop = result["coop"]
    rows = [
        ("linear probe", result["linear_probe"]),
        ("zero-shot", result["zero_shot"]),
        (f"CoOp {coop['shots']}-shot (lr {coop['lr']:g})", coop),
    ]
    domains = list(result["zero_shot"]["per_domain"])
    print(f"  {'':<26}{'all':>8}" + "".join(f"{d:>10}" for d in domains))
    for name, r in rows:
        print(f"  {name:<26}{r['accuracy']:>8.1%}" + "".join(f"{r['per_domain'][d]:>10.1%}" for d in domains))
