"""The ``pfpl`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pfpl.backbones import BackboneError, load_backbone
from pfpl.config import Config, ConfigError, load_config
from pfpl.artifacts import CheckpointError
from pfpl.data import DatasetError, build_dataset
from pfpl.data.partitions import PartitionError
from pfpl.privacy.accounting import PrivacyConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (defaults: the embedded benchmark)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set backbone.name=ViT-B-16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _setup(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _backbone(cfg: Config):
    return load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.device, str(cfg.cache_dir))


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from pfpl.data.features import image_features
    from pfpl.evaluation.zeroshot import zero_shot

    cfg = _setup(args)
    backbone, dataset = _backbone(cfg), build_dataset(cfg.data)
    test = image_features(backbone, dataset, "test", cfg.cache_dir)
    result = zero_shot(backbone, test, dataset.classnames, dataset.domainnames, cfg.prompt.template)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"zero-shot accuracy of {backbone.name} on {dataset.name} (test, {len(test)} images): "
              f"{result['accuracy']:.2%}")
        for name, acc in result["per_domain"].items():
            print(f"  {name:<10} {acc:.2%}")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from pfpl.evaluation.quality import measure_quality

    cfg = _setup(args)
    if args.update_manifest and cfg.backbone.name != "embedded":
        raise ConfigError(f"--update-manifest writes the embedded model's manifest; backbone.name is "
                          f"{cfg.backbone.name!r}, not 'embedded'")
    backbone, dataset = _backbone(cfg), build_dataset(cfg.data)
    result = measure_quality(backbone, dataset, cfg.cache_dir, shots=args.shots, n_ctx=cfg.prompt.n_ctx,
                             seed=cfg.seed, template=cfg.prompt.template, coop_epochs=args.coop_epochs)
    print(json.dumps(result, indent=None if args.json else 2))
    if args.update_manifest:
        from pfpl.backbones.embedded import load_manifest

        folder = Path(cfg.backbone.pretrained) if cfg.backbone.pretrained else None
        print(f"wrote {_record_quality(load_manifest(folder), result, 'pfpl quality --update-manifest', folder)}")
    return 0


def _record_quality(manifest: dict, quality: dict, command: str, folder: Path | None) -> Path:
    """Put measured quality into an embedded manifest and rewrite only the manifest file."""
    from pfpl.backbones.embedded import write_manifest

    manifest["quality"], manifest["quality_command"] = quality, command
    return write_manifest(manifest, folder)


def cmd_pretrain_embedded(args: argparse.Namespace) -> int:
    from pfpl.backbones.embedded import EMBEDDED_CONFIG, assets_dir, save_embedded
    from pfpl.backbones.pretrain import pretrain

    out = args.out or assets_dir()
    settings = {"seed": args.seed}
    if args.steps:
        settings["steps"] = args.steps
    model, record = pretrain(settings, workers=args.workers, log=lambda line: print(line, flush=True))
    manifest = {"name": "embedded", "config": EMBEDDED_CONFIG, "pretraining": record,
                "command": "pfpl pretrain-embedded" + (f" --seed {args.seed}" if args.seed else "")}
    save_embedded(model, manifest, out)
    if not args.no_quality:
        from pfpl.evaluation.quality import measure_quality

        cfg = load_config(None, [])
        backbone = load_backbone("embedded", str(out), "cpu")
        quality = measure_quality(backbone, build_dataset(cfg.data), cfg.cache_dir, template=cfg.prompt.template)
        _record_quality(manifest, quality, "pfpl quality", out)  # the weights are already written
    print(json.dumps({k: manifest.get(k) for k in ("quality",)}, indent=2))
    print(f"wrote {out}")
    return 0


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    setup = summary["setup"]
    table = Table(title=f"{setup['backbone']} on {setup['dataset']}: {setup['n_clients']} clients, "
                        f"{setup['partition']} split, {setup['rounds']} rounds (mean ± std over clients)")
    table.add_column("method")
    table.add_column("local", justify="right")
    table.add_column("neighbor", justify="right")
    table.add_column("ε (δ)", justify="right")
    rows = [("zero-shot", summary["zero_shot"])] + list(summary["methods"].items())
    for name, m in rows:
        privacy = m.get("privacy", {})
        eps = m.get("epsilon")
        eps_text = "—" if name == "zero-shot" else "∞" if eps is None else f"{eps:.2f} ({privacy.get('delta'):g})"
        if privacy.get("nominal"):
            eps_text += " nominal"
        table.add_row(name, f"{m['local']:.2%} ± {m['local_std']:.2%}", f"{m['neighbor']:.2%} ± {m['neighbor_std']:.2%}",
                      eps_text)
    Console().print(table)
    print(f"run folder: {summary['run_dir']}")


def cmd_run(args: argparse.Namespace) -> int:
    from pfpl.federation.runner import new_run_dir, progress_bar, resume, run

    if args.resume and (args.config or args.overrides):
        raise ConfigError("config error: --resume continues with the run folder's own config; drop --config/--set")
    cfg = load_config(args.config, args.overrides) if not args.resume else None
    total = None if cfg is None else len(cfg.train.methods) * cfg.federation.rounds
    with progress_bar(total or 0, enabled=not args.json and not args.quiet and sys.stderr.isatty()) as bar:
        task = bar.add_task("training", total=total) if bar else None

        def progress(method: str, done: int, rounds: int) -> None:
            if bar:
                bar.update(task, advance=1, description=f"{method} round {done}/{rounds}")

        if args.resume:
            summary = resume(args.resume, progress)
        else:
            summary = run(cfg, args.out or new_run_dir(cfg), progress=progress)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from pfpl.federation.runner import progress_bar
    from pfpl.federation.sweep import DEFAULT_EPSILONS, parse_epsilons, run_sweep, sweep_configs

    cfg = _setup(args)
    try:
        epsilons = parse_epsilons(args.epsilons) if args.epsilons else list(DEFAULT_EPSILONS)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sweep_configs(cfg, epsilons)  # every combination is checked before any training
    folder = args.out or cfg.output_dir / f"sweep-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    total = len(epsilons) * len(cfg.train.methods) * cfg.federation.rounds
    with progress_bar(total, enabled=not args.json and sys.stderr.isatty()) as bar:
        task = bar.add_task("sweep", total=total) if bar else None

        def progress(label: str, method: str, done: int, rounds: int) -> None:
            if bar:
                bar.update(task, advance=1, description=f"ε={label} {method} {done}/{rounds}")

        table = run_sweep(cfg, epsilons, folder, progress)
    if args.json:
        print(json.dumps(table))
    else:
        _print_sweep(table)
        print(f"sweep folder: {folder}")
    return 0


def _print_sweep(table: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"local / neighbor accuracy by target ε ({table['mode']} mode, δ = {table['delta']:g})")
    t.add_column("method")
    for label in table["epsilons"]:
        t.add_column("ε=∞" if label == "inf" else f"ε={label}", justify="right")
    for m, by_eps in table["methods"].items():
        t.add_row(m, *[f"{r['local']:.1%} / {r['neighbor']:.1%}" for r in by_eps.values()])
    Console().print(t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfpl", description="Private, personalized federated prompt learning.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: every configured method on the benchmark, a table at the end")
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder (default: output_dir/run-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run from its checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="privacy–utility sweep: target ε × methods, a table and a plot")
    _add_config_args(p)
    p.add_argument("--epsilons", help="comma-separated targets, e.g. 0.1,1,8,inf (default: 0.1,0.5,1,2,4,8,inf)")
    p.add_argument("--out", type=Path, help="sweep folder (default: output_dir/sweep-<time>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy of a backbone on a dataset, overall and per domain")
    _add_config_args(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("quality", help="linear probe, zero-shot and centralised CoOp of a backbone on a dataset")
    _add_config_args(p)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--coop-epochs", type=int, default=30)
    p.add_argument("--update-manifest", action="store_true",
                   help="write the figures into the embedded model's manifest (weights unchanged)")
    p.set_defaults(func=cmd_quality)

    from pfpl.bench import add_parser as add_bench_parser
    from pfpl.cli_audit import add_parser as add_audit_parser

    add_bench_parser(sub)
    add_audit_parser(sub)

    p = sub.add_parser("pretrain-embedded", help="pretrain the embedded tiny CLIP on the shapes world")
    p.add_argument("--out", type=Path, help="output folder (default: the package's assets folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (default from the recipe)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--no-quality", action="store_true", help="skip measuring quality into the manifest")
    p.set_defaults(func=cmd_pretrain_embedded)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, BackboneError, DatasetError, PartitionError, CheckpointError, PrivacyConfigError,
            FileNotFoundError) as exc:
        print(f"pfpl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
