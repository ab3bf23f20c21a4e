"""``pfpl export``: one client's released prompt as a safetensors artifact with its privacy certificate."""

from __future__ import annotations

import argparse
from pathlib import Path

from pfpl.errors import ArtifactError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write one client's released prompt (and its privacy certificate) as a safetensors file",
        description="Write client I's released prompt of method M from a finished run folder: the context "
        "tensor (and vision prompts, for VPT, IVLP, MaPLe or DP-FPL on the image tower), class names, template, "
        "backbone name and weight fingerprint, and a privacy certificate "
        "(ε, δ, mechanism, adjacency, unit; the audit's figures when the run was audited).",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (pfpl run --out)")
    p.add_argument("--method", required=True, help="a method the run trained, e.g. dpfpl")
    p.add_argument("--client", type=int, required=True, help="the client whose prompt to export (0-based)")
    p.add_argument("--out", type=Path, required=True, help="the artifact to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise ArtifactError(f"--out {args.out} exists; pass --overwrite to replace it")
    from pfpl.federation.release import export_prompt

    artifact = export_prompt(args.run_dir, args.method, args.client)
    artifact.save(args.out)
    cert = artifact.certificate
    eps = cert["epsilon"]
    if eps is None:
        privacy = "no finite ε"
    else:
        privacy = f"ε = {eps:.3g} (δ = {cert['delta']:g})"
        if not cert.get("formal_guarantee"):
            why = "nominal" if cert.get("epsilon_kind") == "nominal" else cert.get("randomness", "")
            privacy += f", NO formal guarantee ({why})"
    prompt = "the frozen template" if artifact.context is None else f"{artifact.n_ctx} context tokens"
    if artifact.vision is not None:
        depth, tokens, _ = artifact.vision.shape
        prompt += f" and {tokens} vision tokens in {depth} image layers from layer {artifact.vision_start}"
    print(
        f"wrote {args.out}: {artifact.method} client {artifact.client}, {len(artifact.classnames)} classes, "
        f"{prompt} on {artifact.backbone}; {privacy}"
    )
    return 0
