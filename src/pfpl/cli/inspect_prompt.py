"""``pfpl inspect``: what a prompt artifact holds and what its privacy certificate says."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a prompt artifact's contents and privacy certificate")
    p.add_argument("file", type=Path, metavar="FILE", help="a prompt artifact (pfpl export)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=command)


def describe(artifact) -> dict:
    return {
        "method": artifact.method,
        "client": artifact.client,
        "backbone": artifact.backbone,
        "backbone_pretrained": artifact.backbone_pretrained,
        "backbone_fingerprint": artifact.backbone_fingerprint,
        "format": artifact.format,
        "text": artifact.text,  # "context", or "template": the frozen template's class texts classify
        "context_shape": None if artifact.context is None else list(artifact.context.shape),
        "vision_shape": None if artifact.vision is None else list(artifact.vision.shape),  # [depth, tokens, width]
        "vision_start": None if artifact.vision is None else artifact.vision_start,
        "template": artifact.template,
        "classnames": artifact.classnames,
        "certificate": artifact.certificate,
        "provenance": artifact.provenance,
    }


def command(args: argparse.Namespace) -> int:
    from pfpl.prompts.artifact import PromptArtifact

    info = describe(PromptArtifact.load(args.file))
    if args.json:
        print(json.dumps(info))
        return 0
    cert, names = info["certificate"], info["classnames"]
    eps = "∞ (no finite bound)" if cert["epsilon"] is None else f"{cert['epsilon']:.4g}"
    audit = cert.get("audit")
    rows = [
        ("backbone", f"{info['backbone']} (fingerprint {info['backbone_fingerprint']})"),
        ("classes", f"{len(names)}: {', '.join(names[:8])}" + (" …" if len(names) > 8 else "")),
        ("template", info["template"]),
        ("privacy", cert["guarantee"]),
        ("ε, δ", f"{eps}, {cert['delta']}"),
        # the rest of the certificate, as exported
        *[(k, v) for k, v in cert.items() if k not in {"method", "epsilon", "delta", "guarantee", "audit"}],
        (
            "audit",
            f"AUC {audit['auc_max']:.3f}, ε lower bound {audit['eps_lower_bound_max']:.3g}" if audit else "not audited",
        ),
        *info["provenance"].items(),
    ]
    context = "frozen template" if info["context_shape"] is None else f"context {info['context_shape']}"
    if info["vision_shape"] is not None:
        context += f", vision prompts {info['vision_shape']} from image layer {info['vision_start']}"
    print(f"{args.file}: {info['method']} prompt of client {info['client']}, {context}")
    for label, value in rows:
        print(f"  {label:<24} {value}")
    return 0
