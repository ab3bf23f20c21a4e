"""``pfpl bench --scaling``: the engine's round on the embedded default's world (its model, shapes
features, 40 class names, DP-FPL with step sync) with 10, 100 and 1000 clients that each hold the
same number of classes and records and take the same steps, so seconds per client-step should stay
flat. Each row runs in its own process, so its peak resident memory is its own; the last row repeats
the largest client count with a memory budget (``train.max_sequences``) large enough for a single
client-update call, to show what the budget's split into calls saves.

Clients draw their classes and records at random from the shapes training split (records repeat
across clients once there are more clients than records: the compute does not depend on which
records they are)."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence

import numpy as np

from pfpl.benchmarks.settings import METHOD

CLIENTS = (10, 100, 1000)
CLASSES_PER_CLIENT = 4  # the embedded default's pathological partition: 40 classes over 10 clients
RECORDS_PER_CLIENT = 64
BATCH_SIZE = 32
STEPS = 2
REPEATS = 5


def scaled_clients(labels: np.ndarray, n: int, classes: int, records: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` clients, each ``records`` records of ``classes`` classes drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out = []
    for _ in range(n):
        pool = np.concatenate([by_class[c] for c in rng.choice(len(by_class), classes, replace=False)])
        out.append(np.sort(rng.choice(pool, records, replace=len(pool) < records)))
    return out


def _rss_mib() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return _peak_rss_mib()


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(
    n: int,
    max_sequences: int,
    steps: int = STEPS,
    repeats: int = REPEATS,
    device: str = "auto",
    overrides: Sequence[str] = (),
) -> dict:
    """One row, in this process: build the engine for ``n`` clients, one warm-up round, ``repeats``
    timed rounds; memory before training and at its peak. ``overrides``: config ``key=value``
    settings (tests make the world tiny)."""
    import torch

    from pfpl.backbones import PromptTower, load_backbone
    from pfpl.benchmarks.flops import timed
    from pfpl.config import load_config
    from pfpl.data import build_dataset
    from pfpl.data.clients import ClientData
    from pfpl.data.features import image_features
    from pfpl.federation.client import TrainSettings
    from pfpl.federation.wiring import build_engine

    cfg = load_config(None, list(overrides))
    backbone = load_backbone(cfg.backbone.name, None, device, str(cfg.cache_dir))
    dataset = build_dataset(cfg.data)
    train = image_features(backbone, dataset, "train", cfg.cache_dir)
    clients = scaled_clients(train.labels.numpy(), n, CLASSES_PER_CLIENT, RECORDS_PER_CLIENT, cfg.seed)
    tower = PromptTower(
        backbone, dataset.classnames, cfg.prompt.n_ctx, max_sequences=max_sequences, share_prefix=cfg.train.share_prefix
    )
    settings = TrainSettings(rounds=1, local_steps=steps, batch_size=BATCH_SIZE, sync="step", cosine=False)
    data = ClientData(train, clients, backbone.device)
    sim, _ = build_engine(cfg, METHOD, tower, data, backbone.logit_scale, settings=settings)
    cuda = backbone.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(backbone.device)
    before = _rss_mib()
    sim.run_round()  # warm-up
    seconds = [timed(sim.run_round, backbone.device) for _ in range(repeats)]
    s_round = statistics.median(seconds)
    return {
        "clients": n,
        "max_sequences": max_sequences,
        "clients_per_call": sim.clients_per_call,
        "calls_per_step": -(-n // sim.clients_per_call),
        "s_per_round": s_round,
        "ms_per_client_step": 1e3 * s_round / (n * steps),
        "rss_before_training_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
        "training_rss_increase_mib": _peak_rss_mib() - before,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(backbone.device) / 2**20 if cuda else None,
        "samples_s": seconds,
        "device": str(backbone.device),
        "threads": torch.get_num_threads(),
    }


def in_child(module: str, args: list, what: str) -> dict:
    """``measure(*args)`` of ``pfpl.benchmarks.<module>`` in a fresh interpreter, so that the row's
    peak memory is its own; a failed row is one BenchError naming ``what``."""
    payload = json.dumps(args)
    call = f"measure(*json.loads({payload!r}))"
    code = f"import json; from pfpl.benchmarks.{module} import measure; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        from pfpl.errors import BenchError

        raise BenchError(f"the {what} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_child(n: int, max_sequences: int, steps: int, repeats: int, device: str, overrides: Sequence[str]) -> dict:
    return in_child("scaling", [n, max_sequences, steps, repeats, device, list(overrides)], f"{n}-client row")


def run_scaling_bench(
    clients: Sequence[int] = CLIENTS,
    steps: int = STEPS,
    repeats: int = REPEATS,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    from pfpl.backbones import load_backbone
    from pfpl.config import load_config
    from pfpl.data import build_dataset
    from pfpl.data.features import image_features

    say = log or (lambda message: None)
    cfg = load_config(None, list(overrides))
    say("encoding the shapes training split once (cached for the rows)")
    backbone = load_backbone(cfg.backbone.name, None, device, str(cfg.cache_dir))
    dataset = build_dataset(cfg.data)
    image_features(backbone, dataset, "train", cfg.cache_dir)
    classes = len(dataset.classnames)
    budget = cfg.train.max_sequences
    plan = [(n, budget) for n in clients] + [(max(clients), max(clients) * classes)]
    rows = []
    for n, seqs in plan:
        say(f"{n} clients, memory budget {seqs} sequences")
        rows.append(_in_child(n, seqs, steps, repeats, device, overrides))
    per_step = [r["ms_per_client_step"] for r in rows[:-1]]
    return {
        "rows": rows,
        "client_step_spread": max(per_step) / min(per_step),
        "workload": {
            "backbone": cfg.backbone.name,
            "method": METHOD,
            "sync": "step",
            "classes": classes,
            "classes_per_client": CLASSES_PER_CLIENT,
            "records_per_client": RECORDS_PER_CLIENT,
            "batch_size": BATCH_SIZE,
            "steps": steps,
            "repeats": repeats,
            "n_ctx": cfg.prompt.n_ctx,
            "share_prefix": cfg.train.share_prefix,
            "device": rows[0]["device"],
            "threads": rows[0]["threads"],
        },
    }


def format_scaling(result: dict) -> str:
    wl = result["workload"]
    lines = [
        f"pfpl bench --scaling — {wl['backbone']}, {wl['method']} ({wl['sync']} sync), {wl['classes_per_client']} of "
        f"{wl['classes']} classes and {wl['records_per_client']} records per client, batch {wl['batch_size']}, "
        f"{wl['steps']} steps per round, median of {wl['repeats']}; {wl['device']}, {wl['threads']} thread(s)",
        f"{'clients':>7} {'budget':>7} {'calls/step':>10} {'s/round':>8} {'ms/client-step':>14} "
        f"{'peak RSS MiB':>12} {'training +MiB':>13}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['clients']:>7} {r['max_sequences']:>7} {r['calls_per_step']:>10} {r['s_per_round']:>8.3f} "
            f"{r['ms_per_client_step']:>14.2f} {r['peak_rss_mib']:>12.0f} {r['training_rss_increase_mib']:>13.0f}"
        )
    lines.append(
        f"seconds per client-step, largest over smallest (budgeted rows): {result['client_step_spread']:.2f}×; "
        f"the last row is one call for every client (budget = clients × {wl['classes']} classes)"
    )
    return "\n".join(lines)
