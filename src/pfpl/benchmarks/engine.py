"""``pfpl bench``: seconds per training round of the vectorized engine against the compute pattern
of the published DP-FPL reference (:mod:`pfpl.benchmarks.workload`), on the same backbone, data,
clients and random streams, in one process; and the engine's text-tower throughput (FLOPs counted
with FlopCounterMode over the measured time of its forward + backward alone) against the GFLOP/s
of a large fp32 matmul timed in the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

import torch

from pfpl.backbones import resolve_device
from pfpl.benchmarks.flops import count_flops, default_peak_size, matmul_gflops, text_tower_flops_analytic, timed
from pfpl.benchmarks.settings import METHOD, BenchConfig
from pfpl.benchmarks.workload import Workload, input_size
from pfpl.errors import BenchError


@contextmanager
def full_sequences(tower) -> Iterator[None]:
    """The engine's tower without prefix sharing (every class runs its whole sequence), for comparison."""
    saved, tower.share_prefix = tower.share_prefix, False
    try:
        yield
    finally:
        tower.share_prefix = saved


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Time the engine and the reference (interleaved, after one warm-up round each) and return the report."""
    log = log or (lambda message: None)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg = BenchConfig(**{**asdict(cfg), "device": resolve_device(cfg.device)})
    log(f"building the workload: {cfg.backbone}, encoding {cfg.clients}×{cfg.batch_size} images once for the engine")
    w = Workload.build(cfg)
    device = w.device
    k = cfg.timed_reference_clients
    engine, reference = w.engine(), w.reference(k)

    # the engine's text tower alone, at the engine's shapes: all clients' C prompts, forward + input gradient
    ctx = engine.personalized_context().detach().clone().requires_grad_(True)  # [N, M, D]
    probe = torch.randn(cfg.clients, cfg.num_classes, w.features.shape[1], generator=torch.Generator().manual_seed(1))
    probe = probe.to(device)

    def text_tower_pass() -> None:
        features = w.engine_tower(ctx[:, None])
        torch.autograd.grad(features, ctx, grad_outputs=probe)

    size = cfg.peak_size or default_peak_size(device)
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    out = torch.empty(size, size, device=device)

    log("warm-up (counting FLOPs): engine round, reference round, text tower, matmul")
    engine_flops = count_flops(engine.run_round)
    reference_flops = count_flops(reference.run_round)
    text_flops = count_flops(text_tower_pass)
    with full_sequences(w.engine_tower):
        unshared_text_flops = count_flops(text_tower_pass)
    matmul_gflops(a, b, out, tries=1)
    with full_sequences(w.engine_tower):
        engine.run_round()

    engine_s, reference_s, text_s, peaks, unshared_s = [], [], [], [], []
    for i in range(cfg.repeats):
        engine_s.append(timed(engine.run_round, device))
        reference_s.append(timed(reference.run_round, device))
        text_s.append(timed(text_tower_pass, device))
        peaks.append(matmul_gflops(a, b, out))
        with full_sequences(w.engine_tower):
            unshared_s.append(timed(engine.run_round, device))
        log(
            f"repeat {i + 1}/{cfg.repeats}: engine {engine_s[-1]:.3f} s, reference ({k} of {cfg.clients} clients) "
            f"{reference_s[-1]:.3f} s, text tower {text_s[-1]:.4f} s, matmul {peaks[-1]:.1f} GFLOP/s"
        )

    engine_round = statistics.median(engine_s)
    reference_measured = statistics.median(reference_s)
    reference_round = reference_measured * cfg.clients / k
    text_step = statistics.median(text_s)
    gflops = text_flops / text_step / 1e9
    peak = max(peaks)
    # the counter's cross-check, on full sequences (a closed form for the fused prefix path is not kept)
    analytic = text_tower_flops_analytic(w.backbone, cfg.num_classes * cfg.clients, w.engine_positions)
    result = {
        "speedup": reference_round / engine_round,
        "engine_s_per_round": engine_round,
        "engine_without_prefix_sharing_s_per_round": statistics.median(unshared_s),
        "prefix_sharing_speedup": statistics.median(unshared_s) / engine_round,
        "reference_s_per_round": reference_round,
        "gflops": gflops,
        "peak_gflops": peak,
        "text_tower_fraction_of_peak": gflops / peak,
        "reference_clients_timed": k,
        "reference_s_measured": reference_measured,
        "text_tower_s_per_step": text_step,
        "text_tower_share_of_engine_round": cfg.steps * text_step / engine_round,
        "text_tower_gflop_per_step": text_flops / 1e9,
        "text_tower_gflop_per_step_without_prefix_sharing": unshared_text_flops / 1e9,
        "text_tower_gflop_per_step_analytic": None if analytic is None else analytic / 1e9,  # without sharing
        "engine_gflop_per_round": engine_flops / 1e9,
        "reference_gflop_per_round": reference_flops * cfg.clients / k / 1e9,
        "samples": {
            "engine_s": engine_s,
            "reference_s_measured": reference_s,
            "text_tower_s": text_s,
            "engine_without_prefix_sharing_s": unshared_s,
            "matmul_gflops": peaks,
        },
        "workload": {
            "backbone": cfg.backbone,
            "weights": w.weights,
            "method": METHOD,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "clients": cfg.clients,
            "classes_per_client": cfg.classes_per_client,
            "classes": cfg.num_classes,
            "batch_size": cfg.batch_size,
            "n_ctx": cfg.n_ctx,
            "rank": cfg.rank,
            "steps": cfg.steps,
            "repeats": cfg.repeats,
            "image_size": list(input_size(w.backbone)),
            "engine_text_positions": w.engine_positions,
            "reference_text_positions": w.reference_positions,
            "peak_matmul": f"{size}x{size} @ {size}x{size} fp32",
        },
    }
    bad = [
        key
        for key in ("speedup", "engine_s_per_round", "reference_s_per_round", "gflops", "peak_gflops")
        if not (math.isfinite(result[key]) and result[key] > 0)
    ]
    if bad:
        raise BenchError(f"non-positive or non-finite measurement(s): {', '.join(bad)} (timer resolution?)")
    return result


def format_report(result: dict) -> str:
    wl = result["workload"]
    k, n = result["reference_clients_timed"], wl["clients"]
    scaled = "" if k == n else f"  ({k} of {n} clients timed: {result['reference_s_measured']:.3f} s, ×{n / k:g})"
    h, w = wl["image_size"]
    kind, _, why = wl["weights"].partition(": ")
    weights = f"{kind} weights" + (f": {why}" if why else "")
    lines = [
        f"pfpl bench — {wl['backbone']} ({weights}) at {h}×{w} px, {n} clients × "
        f"{wl['classes_per_client']} classes ({wl['classes']} in all), batch {wl['batch_size']}, "
        f"{wl['n_ctx']} context tokens, rank {wl['rank']}, {wl['method']}, {wl['steps']} step(s) per round; "
        f"{wl['device']}, {wl['threads']} thread(s); median of {wl['repeats']}",
        f"  engine      s/round   {result['engine_s_per_round']:10.4f}",
        f"  engine, no prefix sharing {result['engine_without_prefix_sharing_s_per_round']:6.4f}  "
        f"(prefix sharing: {result['prefix_sharing_speedup']:.2f}×)",
        f"  reference   s/round   {result['reference_s_per_round']:10.4f}{scaled}",
        f"  speedup               {result['speedup']:10.1f} ×",
        f"  text tower  GFLOP/s   {result['gflops']:10.1f}  ({result['text_tower_gflop_per_step']:.3f} GFLOP per step, "
        f"{wl['engine_text_positions']} of {wl['reference_text_positions']} positions, "
        f"{result['text_tower_share_of_engine_round']:.0%} of the engine's round)",
        f"  matmul peak GFLOP/s   {result['peak_gflops']:10.1f}  ({wl['peak_matmul']})",
        f"  text tower / peak     {result['text_tower_fraction_of_peak']:10.1%}",
    ]
    return "\n".join(lines)
