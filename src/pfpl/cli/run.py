"""``pfpl run``: the main job — every configured method on the benchmark, a table at the end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pfpl.artifacts import check_run_folder
from pfpl.cli.common import add_config_args, config_of, interactive, progress_bar
from pfpl.errors import ConfigError
from pfpl.evaluation import SCORES
from pfpl.privacy.rules import validate_dp


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job: every configured method on the benchmark, a table at the end")
    add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder (default: output_dir/run-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="with --out: clear a non-empty run folder first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if args.resume and (args.config or args.overrides or args.out or args.overwrite):
        raise ConfigError(
            "config error: --resume continues the run folder with its own config; drop --config/--set/--out/--overwrite"
        )
    cfg = None
    if not args.resume:
        cfg = config_of(args)
        validate_dp(cfg.dp, cfg.train.methods, cfg.federation, cfg.secfpp.cluster_on)
        if args.out:
            check_run_folder(args.out, args.overwrite)
    from pfpl.federation.runner import new_run_dir, resume, run

    total = None if cfg is None else len(cfg.train.methods) * cfg.federation.rounds
    with progress_bar(interactive(args)) as bar:
        task = bar.add_task("training", total=total) if bar else None

        def progress(method: str, done: int, rounds: int) -> None:
            if bar:
                bar.update(task, advance=1, description=f"{method} round {done}/{rounds}")

        if args.resume:
            summary = resume(args.resume, progress)
        else:
            summary = run(cfg, args.out or new_run_dir(cfg), progress=progress, overwrite=args.overwrite)
    report(summary, args.json)
    return 0


def report(summary: dict, as_json: bool) -> None:
    """A run's summary on stdout: the JSON line (``--json``) or the table."""
    if as_json:
        print(json.dumps(summary))
    else:
        print_table(summary)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    setup = summary["setup"]
    when = "mean of the last 10 rounds" if setup.get("report") == "mean-last-10" else "final round"
    split = (f", {setup['novel_classes']} novel classes held out" if setup.get("novel_classes") else "") + (
        f", domain {setup['held_out_domain']!r} held out" if setup.get("held_out_domain") else ""
    )
    table = Table(
        title=f"{setup['backbone']} on {setup['dataset']}: {setup['n_clients']} clients, "
        f"{setup['partition']} split{split}, {setup['rounds']} rounds, {when} (mean ± std over clients)"
    )
    rows = [("zero-shot", summary["zero_shot"])] + list(summary["methods"].items())
    columns = [k for k in SCORES if k in rows[0][1]]
    table.add_column("method")
    for key in columns:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_column("ε (δ)", justify="right")
    if any("ari" in m for _, m in rows):
        table.add_column("ARI", justify="right")

    def cell(m: dict, key: str) -> str:
        if m.get(key) is None:
            return "—"
        std = m.get(f"{key}_std")
        return f"{m[key]:.2%}" + ("" if std is None else f" ± {std:.2%}")

    for name, m in rows:
        privacy = m.get("privacy", {})
        eps = m.get("epsilon")
        eps_text = "—" if name == "zero-shot" else "∞" if eps is None else f"{eps:.2f} ({privacy.get('delta'):g})"
        if privacy.get("nominal"):
            eps_text += " nominal"
        elif eps is not None and privacy.get("randomness") == "seeded" and m.get("epsilon_kind") == "accounted":
            eps_text += " seeded, not formal"  # the noise is regenerable from the config seed
        extra = [f"{m['ari']:.2f}" if m.get("ari") is not None else "—"] if any("ari" in x for _, x in rows) else []
        table.add_row(name, *[cell(m, k) for k in columns], eps_text, *extra)
    Console().print(table)
    print(f"run folder: {summary['run_dir']}")
