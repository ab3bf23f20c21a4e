"""``pfpl sweep``: the privacy–utility trade-off, target ε × methods, a table and a plot."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from pfpl.cli.common import add_config_args, config_of, interactive, progress_bar
from pfpl.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="privacy–utility sweep: target ε × methods, a table and a plot")
    add_config_args(p)
    p.add_argument("--epsilons", help="comma-separated targets, e.g. 0.1,1,8,inf (default: 0.1,0.5,1,2,4,8,inf)")
    p.add_argument("--out", type=Path, help="sweep folder (default: output_dir/sweep-<time>)")
    p.set_defaults(func=command)


def parse_epsilons(text: str | None) -> list[float]:
    """``0.1,1,inf`` → [0.1, 1.0, inf] (default: 0.1, 0.5, 1, 2, 4, 8, ∞); a bad value is a ConfigError."""
    import math

    if not text:
        return [0.1, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            value = math.inf if item in ("inf", "∞") else float(item)
        except ValueError:
            raise ConfigError(f"--epsilons: {item!r} is not a number (or inf)") from None
        if not value > 0:
            raise ConfigError(f"--epsilons: ε must be > 0 (or inf), got {item!r}")
        values.append(value)
    return values


def command(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    epsilons = parse_epsilons(args.epsilons)
    from pfpl.federation.sweep import default_methods, run_sweep, sweep_configs

    cfg, left = default_methods(cfg)
    if left:
        print(
            f"pfpl: note: left out of the sweep's default methods: {', '.join(left)} (it clusters clients on raw "
            "image features, which no DP covers; list it with secfpp.cluster_on='prompts' to include it)",
            file=sys.stderr,
        )
    sweep_configs(cfg, epsilons)  # every combination is checked before any training
    folder = args.out or cfg.output_dir / f"sweep-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    total = len(epsilons) * len(cfg.train.methods) * cfg.federation.rounds
    with progress_bar(interactive(args)) as bar:
        task = bar.add_task("sweep", total=total) if bar else None

        def progress(label: str, method: str, done: int, rounds: int) -> None:
            if bar:
                bar.update(task, advance=1, description=f"ε={label} {method} {done}/{rounds}")

        table = run_sweep(cfg, epsilons, folder, progress)
    if args.json:
        print(json.dumps(table))
    else:
        print_sweep(table)
        print(f"sweep folder: {folder}")
    return 0


def print_sweep(table: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    caveat = (
        ", NOMINAL ε"
        if table.get("nominal")
        else ", SEEDED noise: no formal guarantee"
        if table.get("randomness") == "seeded"
        else ""
    )
    t = Table(title=f"local / neighbor accuracy by target ε ({table['mode']} mode, δ = {table['delta']:g}{caveat})")
    t.add_column("method")
    for label in table["epsilons"]:
        t.add_column("ε=∞" if label == "inf" else f"ε={label}", justify="right")
    for m, by_eps in table["methods"].items():
        t.add_row(m, *[f"{r['local']:.1%} / {r['neighbor']:.1%}" for r in by_eps.values()])
    Console().print(t)
