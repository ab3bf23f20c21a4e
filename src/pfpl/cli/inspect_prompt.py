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
    cert = info["certificate"]
    print(f"{args.file}: {info['method']} prompt of client {info['client']}, context {info['context_shape']}")
    print(f"  backbone      {info['backbone']} (fingerprint {info['backbone_fingerprint']})")
    print(
        f"  classes       {len(info['classnames'])}: {', '.join(info['classnames'][:8])}"
        + (" …" if len(info["classnames"]) > 8 else "")
    )
    print(f"  template      {info['template']}")
    eps = "∞ (no finite bound)" if cert["epsilon"] is None else f"{cert['epsilon']:.4g}"
    print(f"  privacy       {cert['guarantee']}")
    print(f"  ε, δ          {eps}, {cert['delta']}")
    for key in (
        "dp_mode",
        "adjacency",
        "unit",
        "clip",
        "noise_multiplier",
        "global_noise_multiplier",
        "sampling",
        "accountant",
        "rounds",
        "local_steps_per_round",
        "client_level_epsilon",
    ):
        print(f"  {key:<24} {cert.get(key)}")
    audit = cert.get("audit")
    print(
        "  audit         "
        + (
            "not audited"
            if not audit
            else f"AUC {audit['auc_max']:.3f}, ε lower bound {audit['eps_lower_bound_max']:.3g}"
        )
    )
    for key, value in info["provenance"].items():
        print(f"  {key:<24} {value}")
    return 0
