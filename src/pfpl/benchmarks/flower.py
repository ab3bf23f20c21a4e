"""``pfpl bench --flower``: a training round on a local Flower federation (SuperLink + SuperNodes on
loopback) against the same round in the simulator, the share of pfpl's secure aggregation in a
Flower round, and Flower's own SecAgg+ on a vector of the same length — side by side in one run.

Workload: DP-FPL on the embedded model, ``SETTINGS`` below (FedAvg sync: one train exchange per
round). Simulator seconds are the median of timed rounds after a warm-up; Flower seconds are the
ServerApp's own time in training rounds (``train_s``) divided by the rounds, so SuperLink start-up,
the SuperNodes' first feature extraction and evaluation are left out of both.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pfpl.errors import BenchError

SETTINGS = [
    "federation.n_clients=6",
    "federation.sync='fedavg'",
    "federation.local_steps=5",
    "federation.rounds=2",
    "train.methods=['dpfpl']",
]


def _simulated_round_s(cfg, rounds: int) -> tuple[float, int]:
    """(median seconds per simulated round, length of the shared vector a client uploads)."""
    from pfpl.federation.runner import Benchmark

    sim, _ = Benchmark(cfg).engine("dpfpl")
    sim.run_round()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sim.run_round()
        times.append(time.perf_counter() - start)
    length = sum(int(v[0].numel()) for v in sim.server.shared.values())
    return statistics.median(times), length


def run_flower_bench(
    supernodes: int = 3, log: Callable[[str], None] | None = None, overrides: tuple[str, ...] = ()
) -> dict:
    """``overrides``: config ``key=value`` settings after the benchmark's own (tests make it tiny)."""
    from pfpl.config import load_config
    from pfpl.federation.flower.launch import LocalFederation

    if supernodes < 3:
        raise BenchError(
            f"--flower needs at least 3 SuperNodes (Flower's SecAgg+ shares among more than 2), got {supernodes}"
        )
    say = log or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="pfpl-bench-flower-") as tmp:
        work = Path(tmp)
        settings = [*SETTINGS, f"cache_dir='{work / 'cache'}'", *overrides]
        cfg = load_config(None, settings)
        secure_cfg = load_config(None, [*settings, "federation.secure_aggregation=true"])
        rounds = cfg.federation.rounds
        say("simulator: timed rounds")
        sim_s, length = _simulated_round_s(cfg, rounds)
        rows = {}
        with LocalFederation(supernodes, work / "cache") as federation:
            for label, c in (("flower", cfg), ("flower + secure aggregation", secure_cfg)):
                say(f"{label}: {rounds} rounds on {supernodes} SuperNodes")
                job = {"config": json.loads(c.model_dump_json()), "run_dir": str(work / label.replace(" ", "-"))}
                flower = federation.run(job)["methods"]["dpfpl"]["flower"]
                rows[label] = {
                    "round_s": flower["train_s"] / rounds,
                    "secure_aggregation_s": flower["secure_aggregation_s"] / rounds,
                }
            say(f"Flower's SecAgg+ (legacy workflow): one round on a vector of {length}")
            job = {"length": length, "run_dir": str(work / "secaggplus")}
            flower_secagg = federation.run(job, apps="pfpl.benchmarks.flower_secaggplus")["round_s"]
    secure = rows["flower + secure aggregation"]
    return {
        "simulator_round_s": sim_s,
        "rows": rows,
        "flower_over_simulator": rows["flower"]["round_s"] / sim_s,
        "secure_share_of_flower_round": secure["secure_aggregation_s"] / secure["round_s"],
        "flower_secaggplus_round_s": flower_secagg,
        "vector_length": length,
        "supernodes": supernodes,
        "clients": cfg.federation.n_clients,
        "threads": torch.get_num_threads(),
        "note": "DP-FPL, FedAvg sync; Flower time = the ServerApp's training rounds (SuperLink round trips "
        "and a fresh ClientApp process per message included); Flower SecAgg+ = one legacy-workflow round "
        "of a random vector of the same length, one client per SuperNode",
    }


def format_flower(result: dict) -> str:
    lines = [
        f"{'path':<30} {'s/round':>9} {'secure agg s':>13}",
        f"{'simulator':<30} {result['simulator_round_s']:>9.3f}",
    ]
    for label, row in result["rows"].items():
        lines.append(f"{label:<30} {row['round_s']:>9.2f} {row['secure_aggregation_s']:>13.2f}")
    lines += [
        f"Flower / simulator: {result['flower_over_simulator']:.1f}×; secure aggregation: "
        f"{result['secure_share_of_flower_round']:.0%} of a secure Flower round",
        f"Flower's own SecAgg+ (legacy workflow), one round on {result['vector_length']} floats: "
        f"{result['flower_secaggplus_round_s']:.1f} s",
        f"{result['supernodes']} SuperNodes, {result['clients']} clients; {result['note']}",
    ]
    return "\n".join(lines)
