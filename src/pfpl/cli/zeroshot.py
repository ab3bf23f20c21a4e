"""``pfpl zeroshot``: zero-shot accuracy of a backbone on a dataset, overall and per domain."""

from __future__ import annotations

import argparse
import json

from pfpl.cli.common import add_config_args, config_of


def add_parser(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy of a backbone on a dataset, overall and per domain")
    add_config_args(p)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from pfpl.backbones import load_backbone
    from pfpl.data import build_dataset
    from pfpl.data.features import image_features
    from pfpl.evaluation.zeroshot import zero_shot

    backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.device, str(cfg.cache_dir))
    dataset = build_dataset(cfg.data)
    test = image_features(backbone, dataset, "test", cfg.cache_dir)
    result = zero_shot(backbone, test, dataset.classnames, dataset.domainnames, cfg.prompt.template)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"zero-shot accuracy of {backbone.name} on {dataset.name} (test, {len(test)} images): "
            f"{result['accuracy']:.2%}"
        )
        for name, acc in result["per_domain"].items():
            print(f"  {name:<10} {acc:.2%}")
    return 0
