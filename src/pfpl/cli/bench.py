"""``pfpl bench``: the engine against the published reference's compute pattern, or the cost of DP."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from pfpl.benchmarks.settings import BenchConfig, validate


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_parser(sub) -> None:
    d = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="seconds per round: the engine against the published reference's compute pattern",
        description="Seconds per round of the vectorized engine and of the published DP-FPL reference's compute "
        "pattern (clients one after another, image tower on every batch, 77-position text sequences) "
        "on the same backbone, data and clients, and the engine's text-tower GFLOP/s against a "
        "matmul peak measured in the same run. open_clip models get random weights "
        "(timings do not depend on them).",
    )
    p.add_argument(
        "--backbone",
        default=d.backbone,
        help="open_clip model name, or 'embedded' for the embedded model (default: %(default)s)",
    )
    p.add_argument("--clients", type=_positive_int, default=d.clients, help="default: %(default)s")
    p.add_argument(
        "--classes-per-client",
        type=_positive_int,
        default=d.classes_per_client,
        help="classes per client; the label space has clients × this many (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--n-ctx", type=_positive_int, default=d.n_ctx, help="context tokens (default: %(default)s)")
    p.add_argument(
        "--rank", type=_positive_int, default=d.rank, help="DP-FPL factorization rank (default: %(default)s)"
    )
    p.add_argument(
        "--steps", type=_positive_int, default=d.steps, help="local steps per client per round (default: %(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=d.repeats,
        help="timed rounds per path; the median is reported (default: %(default)s)",
    )
    p.add_argument(
        "--reference-clients",
        type=_positive_int,
        metavar="K",
        help="time only K clients of the reference and scale to all (its round is linear in clients; default: all)",
    )
    p.add_argument("--image-size", type=_positive_int, help="input size in pixels (default: the model's)")
    p.add_argument(
        "--peak-size",
        type=_positive_int,
        help="side of the square fp32 matmul for the peak (default: 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d.device, help="default: %(default)s")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument(
        "--dp", action="store_true", help="time DP steps (feature, per-sample) against a non-private step instead"
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="time one secure-aggregation protocol round (10, 100, 1000 clients) against a training round",
    )
    p.add_argument(
        "--secpc", action="store_true", help="time one SecPC secure clustering (10, 100, 1000 clients) against a round"
    )
    p.add_argument(
        "--fedsp", action="store_true", help="time a FedSP client against a PromptFL client with the full model"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="seconds per round and client-step, and peak memory, of the embedded default with 10, 100, 1000 clients",
    )
    p.add_argument(
        "--flower",
        action="store_true",
        help="time a round on a local Flower federation against the simulator, with and without secure aggregation",
    )
    p.add_argument(
        "--vision",
        action="store_true",
        help="seconds per round and peak memory of vision- and both-tower prompts against text prompts (10, 100 "
        "clients)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=command)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        backbone=args.backbone,
        clients=args.clients,
        classes_per_client=args.classes_per_client,
        batch_size=args.batch_size,
        n_ctx=args.n_ctx,
        rank=args.rank,
        steps=args.steps,
        repeats=args.repeats,
        reference_clients=args.reference_clients,
        image_size=args.image_size,
        device=args.device,
        peak_size=args.peak_size,
        threads=args.threads,
    )


STANDALONE = (
    "flower",
    "fedsp",
    "secpc",
    "secagg",
    "scaling",
    "vision",
)  # --flower, …: each module has run_<flag>_bench, format_<flag>


def command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    validate(cfg)
    log = (lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    for flag in STANDALONE:  # benches with their own fixed workload: pfpl.benchmarks.<flag>
        if getattr(args, flag):
            module = importlib.import_module(f"pfpl.benchmarks.{flag}")
            result = getattr(module, f"run_{flag}_bench")(log=log)
            print(json.dumps(result) if args.json else getattr(module, f"format_{flag}")(result))
            return 0
    if args.dp:
        from pfpl.benchmarks.dp import run_dp_bench

        result = run_dp_bench(cfg, log)
    else:
        from pfpl.benchmarks.engine import run_bench

        result = run_bench(cfg, log)
    if args.json:
        print(json.dumps(result))
    elif args.dp:
        print(
            f"DP step cost on {cfg.backbone} ({cfg.clients} clients × {cfg.num_classes} classes, batch "
            f"{cfg.batch_size}): non-private {result['non_private_s_per_round']:.3f} s/round; "
            f"feature {result['feature_s_per_round']:.3f} s ({result['feature_overhead']:.2f}×); "
            f"per-sample {result['per_sample_s_per_round']:.3f} s ({result['per_sample_overhead']:.2f}×)"
        )
    else:
        from pfpl.benchmarks.engine import format_report

        print(format_report(result))
    return 0
