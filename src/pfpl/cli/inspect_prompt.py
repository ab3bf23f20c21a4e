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
        "context_shape": list(artifact.context.shape),
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
    print(f"{args.file}: {info['method']} prompt of client {info['client']}, context {info['context_shape']}")
    for label, value in rows:
        print(f"  {label:<24} {value}")
    return 0
