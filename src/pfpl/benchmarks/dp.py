"""``pfpl bench --dp``: seconds per engine round of a DP step against a non-private one, interleaved
in one process, on the same workload. ``feature``: clipped per-record text-feature gradients, one
backward; ``per-sample``: exact per-record gradients of DP-FPL's u, v (vmapped backward over
per-record cotangents) plus per-record clipping of the global gradient and global DP at the server.
Both are built by the engine factory from a ``dp`` config, as a run builds them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pfpl.benchmarks.flops import timed
from pfpl.benchmarks.settings import METHOD, BenchConfig
from pfpl.benchmarks.workload import Workload
from pfpl.config import load_config

DP_CONFIGS = {
    "off": [],
    "feature": ["dp.mode=feature", "dp.noise_multiplier=1.0", "dp.clip=10"],
    "per-sample": ["dp.mode=per-sample", "dp.noise_multiplier=1.0", "dp.clip=10", "dp.global_dp=true"],
}


def run_dp_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    workload = Workload.build(cfg)
    sims = {mode: workload.engine(load_config(None, overrides)) for mode, overrides in DP_CONFIGS.items()}
    for mode, sim in sims.items():  # warm-up
        if log:
            log(f"warm-up: {mode}")
        sim.run_round()
    samples: dict[str, list[float]] = {m: [] for m in sims}
    for r in range(cfg.repeats):
        for mode, sim in sims.items():
            samples[mode].append(timed(sim.run_round, workload.device))
        if log:
            log(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(f"{m} {v[-1]:.3f}s" for m, v in samples.items()))
    med = {m: float(np.median(v)) for m, v in samples.items()}
    return {
        "feature_overhead": med["feature"] / med["off"],
        "per_sample_overhead": med["per-sample"] / med["off"],
        "non_private_s_per_round": med["off"],
        "feature_s_per_round": med["feature"],
        "per_sample_s_per_round": med["per-sample"],
        "samples": samples,
        "workload": {
            "backbone": cfg.backbone,
            "clients": cfg.clients,
            "classes": cfg.num_classes,
            "batch_size": cfg.batch_size,
            "n_ctx": cfg.n_ctx,
            "rank": cfg.rank,
            "steps": cfg.steps,
            "method": METHOD,
            "threads": torch.get_num_threads(),
        },
    }
