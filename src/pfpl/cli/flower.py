"""``pfpl flower``: runs on a Flower federation.

``pfpl flower run`` starts a SuperLink and N SuperNodes on loopback (``--tls``: with TLS and SuperNode
authentication), runs the federation (the same methods, privacy and aggregation as ``pfpl run``),
writes the same run folder and stops every process it started. ``pfpl flower job`` writes the job
file a deployment's ``flwr run`` takes (README, "Beyond one machine").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pfpl.cli.common import add_config_args, config_of
from pfpl.errors import ConfigError, DeploymentError


def add_parser(sub) -> None:
    p = sub.add_parser("flower", help="run on a Flower federation (SuperLink + SuperNodes)")
    commands = p.add_subparsers(dest="flower_command", required=True)
    r = commands.add_parser(
        "run", help="a SuperLink and N SuperNodes on loopback, one run, everything stopped afterwards"
    )
    add_config_args(r)
    r.add_argument("--supernodes", type=int, default=3, help="SuperNodes to start (default: %(default)s)")
    r.add_argument("--out", type=Path, help="run folder (default: output_dir/run-<time>)")
    r.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed Flower run from its checkpoint")
    r.add_argument("--overwrite", action="store_true", help="with --out: clear a non-empty run folder first")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one exchange's replies")
    r.add_argument(
        "--tls",
        action="store_true",
        help="TLS with a CA and certificates made for the run, and SuperNode authentication (registered keys)",
    )
    r.add_argument(
        "--plain-supernodes",
        action="store_true",
        help="plain flower-supernode with Flower's default waits (what a deployment pays), not pfpl's loopback ones",
    )
    r.set_defaults(func=command_run)
    j = commands.add_parser("job", help="write the job file for `flwr run` on a deployment's SuperLink")
    add_config_args(j)
    j.add_argument("--supernodes", type=int, required=True, help="SuperNodes the deployment has")
    j.add_argument("--out", type=Path, required=True, help="run folder, on the SuperLink's host")
    j.add_argument("--file", type=Path, required=True, help="where to write the job (JSON)")
    j.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one exchange's replies")
    j.set_defaults(func=command_job)


def flower_config(args: argparse.Namespace):
    """The run's config, with the default methods Flower can run (a note names those left out)."""
    from pfpl.federation.flower.node import flower_refusal
    from pfpl.privacy.rules import validate_dp

    cfg = config_of(args)
    validate_dp(cfg.dp, cfg.train.methods, cfg.federation, cfg.secfpp.cluster_on)
    if "methods" not in cfg.train.model_fields_set:
        left = [m for m in cfg.train.methods if flower_refusal(m)]
        if left:
            cfg.train.methods = [m for m in cfg.train.methods if m not in left]
            print(
                f"pfpl: note: left out of the default methods on Flower: {', '.join(left)} ({flower_refusal(left[0])})",
                file=sys.stderr,
            )
    for m in cfg.train.methods:
        why = flower_refusal(m)
        if why:
            raise ConfigError(f"config error: {why}")
    return cfg


def _job(cfg, out: Path, timeout: float, **extra) -> dict:
    return {
        "config": json.loads(cfg.model_dump_json()),
        "run_dir": str(Path(out).resolve()),
        "timeout": timeout,
        **extra,
    }


def command_run(args: argparse.Namespace) -> int:
    from pfpl.artifacts import RunFolder, check_run_folder

    if args.resume and (args.config or args.overrides or args.out or args.overwrite):
        raise ConfigError(
            "config error: --resume continues the run folder with its own config; drop --config/--set/--out/--overwrite"
        )
    if args.resume:
        from pfpl.config import build_config

        state = RunFolder(args.resume).load_checkpoint()
        cfg, out = build_config(state["config"]), args.resume
        job = _job(cfg, out, args.timeout, resume=True)
    else:
        cfg = flower_config(args)
        from pfpl.federation.runner import new_run_dir

        out = args.out or new_run_dir(cfg)
        if args.out:
            check_run_folder(args.out, args.overwrite)
        job = _job(cfg, out, args.timeout, overwrite=args.overwrite)
    from pfpl.federation.flower.launch import LocalFederation

    try:
        with LocalFederation(
            args.supernodes, cfg.cache_dir, tls=args.tls, fast=not args.plain_supernodes
        ) as federation:
            summary = federation.run(job)
    except KeyboardInterrupt:
        raise DeploymentError(f"interrupted; every Flower process was stopped; continue with --resume {out}") from None
    from pfpl.cli.run import report

    report(summary, args.json)
    if not args.json:
        print(f"run folder: {summary['run_dir']}")
    return 0


def command_job(args: argparse.Namespace) -> int:
    from pfpl.artifacts import atomic_write_text

    cfg = flower_config(args)
    if args.supernodes < 1:
        raise ConfigError(f"config error: --supernodes must be at least 1, got {args.supernodes}")
    job = _job(
        cfg, args.out, args.timeout, supernodes=args.supernodes, result=str(Path(args.file).resolve()) + ".result"
    )
    atomic_write_text(Path(args.file), json.dumps(job, indent=2))
    where = Path(args.file).resolve()
    print(f"job written to {where}; on the SuperLink's host: flwr run . <connection> --run-config \"job='{where}'\"")
    return 0
