"""What several commands share: config arguments and the progress bar (on stderr)."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from pfpl.config import Config, load_config


def add_config_args(p: argparse.ArgumentParser, json: bool = True) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (defaults: the embedded benchmark)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set backbone.name=ViT-B-16 (repeatable)",
    )
    if json:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def config_of(args: argparse.Namespace) -> Config:
    """The command's config; how its defaults were resolved goes to stderr, one line each."""
    cfg = load_config(args.config, args.overrides)
    for note in cfg.notes:
        print(f"pfpl: note: {note}", file=sys.stderr)
    return cfg


def interactive(args: argparse.Namespace) -> bool:
    """Progress output is for a person at a terminal: not with --json / --quiet, not into a pipe."""
    return not getattr(args, "json", False) and not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress_bar(enabled: bool):
    """A rich progress bar on stderr, or a no-op when disabled (tests, pipes)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
