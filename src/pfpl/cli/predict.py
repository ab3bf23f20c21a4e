"""``pfpl predict``: classify images with a prompt artifact and the backbone it names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images (files or folders) with a prompt artifact")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders (searched recursively)")
    p.add_argument("--prompt", type=Path, required=True, help="a prompt artifact (pfpl export)")
    p.add_argument("--top-k", type=int, default=1, help="classes to report per image (default: %(default)s)")
    p.add_argument("--pretrained", help="the backbone's weights (default: the path or tag the prompt was trained with)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print one JSON list of predictions")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from pfpl.evaluation.predict import backbone_for, classify, image_paths
    from pfpl.prompts.artifact import PromptArtifact

    artifact = PromptArtifact.load(args.prompt)
    paths = image_paths(args.images)
    backbone = backbone_for(artifact, args.pretrained, args.device)
    rows = classify(artifact, backbone, paths, args.top_k)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in row["top"])
        print(f"{row['image']}\t{best}")
    return 0
