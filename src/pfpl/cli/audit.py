"""``pfpl audit``: membership-inference audits of a run's released prompts (see docs/audit.md).

pfpl audit RUN_DIR [RUN_DIR ...] [--methods coop dpfpl] [--clients 0,1,2] [--shadows K] [--json]
pfpl audit SWEEP_DIR ...            # every eps-* run of a sweep, plus a combined report and plot
pfpl audit --config FILE [--set KEY=VALUE ...] [--epsilons 1,4,8,inf]
                                    # first train an audit-sized run (or an ε sweep), then audit it
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC
from pathlib import Path

from pfpl.audit import DEFAULT_SHADOWS, check_shadows
from pfpl.cli.sweep import parse_epsilons
from pfpl.config import load_config
from pfpl.errors import AuditError


def _int_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-3`` (or a mix) → sorted unique ints."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected client ids like 0,1,2 or 0-3, got {text!r}") from None
    if any(c < 0 for c in out):
        raise argparse.ArgumentTypeError(f"client ids must be >= 0, got {text!r}")
    return sorted(out)


def _names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n for v in values for n in v.replace(",", " ").split() if n]


def add_parser(subparsers) -> None:
    """Register ``pfpl audit`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "audit",
        help="membership-inference audit of a run's released prompts (LiRA, shadow model, loss)",
        description="Membership-inference attacks on each audited client's released prompt (global + local "
        "parts): loss threshold, calibrated loss, LiRA online/offline and the DP-FPL shadow-model "
        "attack. Members are the client's training records, non-members held-out records of the "
        "same classes and domains; shadows repeat the client's training (method, hyper-parameters, "
        "DP) on known data. Writes audit.json and audit.png into the run folder.",
    )
    p.add_argument(
        "run_dirs",
        nargs="*",
        type=Path,
        metavar="RUN_DIR",
        help="finished run folder(s), or a sweep folder (all its eps-* runs)",
    )
    p.add_argument("--config", type=Path, help="instead of RUN_DIR: train a run of this config first, then audit it")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --config: override one config value (repeatable)",
    )
    p.add_argument("--epsilons", help="with --config: train an ε sweep (e.g. 1,4,8,inf) and audit every run")
    p.add_argument(
        "--out",
        type=Path,
        help="with --config: the run/sweep folder; with several RUN_DIRs: where the combined audit.json/png go",
    )
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to audit (default: every method of the run)")
    p.add_argument("--clients", type=_int_list, help="target clients, e.g. 0,1,2 or 0-3 (default: all)")
    p.add_argument(
        "--shadows",
        type=int,
        default=DEFAULT_SHADOWS,
        help="LiRA shadow prompts per target client, K >= 4 (default: %(default)s)",
    )
    p.add_argument(
        "--shadow-model-shadows",
        type=int,
        dest="shokri_shadows",
        help="shadows of the shadow-model attack per client (default: max(2, K/2); 0 skips that attack)",
    )
    p.add_argument("--members", type=int, help="audit a random N of each client's training records (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of member subsets and shadow data (default: 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=command)


def _table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"membership-inference audit of {report['run_dir']}",
        caption=(
            f"ε: the accountant's (∞ = no DP); TPR at 1% / 0.1% FPR; acc: best balanced accuracy; ε LB: empirical "
            f"ε lower bound at δ = {report['delta']:g}, {report['confidence']:.0%} confidence (pooled over clients)"
        ),
    )
    for col in ("method", "ε", "attack", "AUC", "TPR@1%", "TPR@.1%", "acc", "ε LB"):
        t.add_column(col, justify="left" if col in ("method", "attack") else "right")
    for m, r in report["methods"].items():
        eps = "∞" if r["accountant_epsilon"] is None else f"{r['accountant_epsilon']:.2f}"
        if r.get("nominal"):
            eps += " (nominal)"
        for i, (name, a) in enumerate(r["attacks"].items()):
            t.add_row(
                m if i == 0 else "",
                eps if i == 0 else "",
                name,
                f"{a['auc']:.3f}",
                f"{a['tpr_at_1pct_fpr']:.3f}",
                f"{a['tpr_at_0.1pct_fpr']:.3f}",
                f"{a['accuracy']:.3f}",
                f"{a['eps_lower_bound']:.2f}",
            )
    Console().print(t)


def _print_violations(reports: list[dict]) -> None:
    for rep in reports:
        for v in rep["violations"]:
            tag = " (nominal ε: no formal guarantee)" if v["nominal"] else " — a privacy bug or a broken accountant"
            print(
                f"pfpl audit: WARNING {rep['run_dir']} {v['method']} {v['attack']} ({v['scope']}): empirical ε lower "
                f"bound {v['eps_lower_bound']:.2f} exceeds the accountant's ε {v['accountant_epsilon']}{tag}",
                file=sys.stderr,
            )


def command(args: argparse.Namespace) -> int:
    if args.config and args.run_dirs:
        raise AuditError("give either RUN_DIR(s) or --config, not both")
    if not args.config and not args.run_dirs:
        raise AuditError("give a run folder to audit (pfpl audit RUN_DIR) or a config to train one (--config FILE)")
    if not args.config and (args.overrides or args.epsilons):
        raise AuditError("--set and --epsilons only apply with --config")
    check_shadows(args.shadows)
    if args.shokri_shadows is not None and (args.shokri_shadows < 0 or args.shokri_shadows == 1):
        raise AuditError(f"--shadow-model-shadows must be 0 (skip) or at least 2, got {args.shokri_shadows}")
    if args.members is not None and args.members < 1:
        raise AuditError(f"--members must be at least 1, got {args.members}")
    methods = _names(args.methods)
    verbose = not args.json and not args.quiet
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if verbose else None
    paths = list(args.run_dirs)
    out_dir = args.out
    cfg = load_config(args.config, args.overrides) if args.config else None
    epsilons = parse_epsilons(args.epsilons) if args.epsilons else None
    if cfg is not None and methods:
        unknown = [m for m in methods if m not in cfg.train.methods]
        if unknown:
            raise AuditError(
                f"method {unknown[0]!r} is not trained by this config (train.methods = {', '.join(cfg.train.methods)})"
            )
    from pfpl.audit.audit import audit_many

    if cfg is not None and epsilons is not None:
        from datetime import datetime

        from pfpl.federation.sweep import run_sweep, sweep_configs

        sweep_configs(cfg, epsilons)
        folder = args.out or cfg.output_dir / f"audit-sweep-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        if log:
            log(f"training the ε sweep into {folder}")
        run_sweep(cfg, epsilons, folder, (lambda label, m, d, t: log(f"ε={label} {m} round {d}/{t}")) if log else None)
        paths, out_dir = [folder], folder
    elif cfg is not None:
        from pfpl.federation.runner import new_run_dir, run

        folder = args.out or new_run_dir(cfg)
        if log:
            log(f"training the audit run into {folder}")
        run(cfg, folder, progress=(lambda m, d, t: log(f"{m} round {d}/{t}")) if log else None)
        paths, out_dir = [folder], None
    report = audit_many(
        paths,
        out_dir,
        methods=methods,
        clients=args.clients,
        shadows=args.shadows,
        shokri_shadows=args.shokri_shadows,
        max_members=args.members,
        seed=args.seed,
        log=log,
    )
    reports = list(report["runs"].values()) if "runs" in report else [report]
    if args.json:
        print(json.dumps(report))
    else:
        for rep in reports:
            _table(rep)
            print(f"wrote {Path(rep['run_dir']) / 'audit.json'} and audit.png")
        if report.get("out_dir"):
            print(f"combined report: {Path(report['out_dir']) / 'audit.json'} and audit.png")
    _print_violations(reports)
    return 0
