"""``pfpl bench --flower``: a training exchange on a local Flower federation (SuperLink + SuperNodes on
loopback, each SuperNode with its warm worker) against the same exchange in the simulator, the cost
of pfpl's secure aggregation there, what plain ``flower-supernode`` (Flower's default waits, as a
deployment runs it) costs, and Flower's own SecAgg+ on a vector of the same length — in one run.

Workload: DP-FPL on the embedded model, ``SETTINGS`` below (FedAvg sync: one train exchange per
round, so seconds per exchange are seconds per training round). Simulator seconds are the median of
timed rounds after a warm-up; Flower seconds are the ServerApp's own time in training rounds
(``train_s``) divided by the rounds, so SuperLink start-up, the SuperNodes' first feature extraction
and evaluation are left out of both. Under secure aggregation the run's first exchange also runs its
instances' two key rounds in round trips of their own (later ones ride on the exchange before):
``secure_round_trips_per_exchange`` is (2 + rounds) / rounds. The workers start with the federation's first message (the
hello), so a timed exchange finds them warm.
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
    "federation.rounds=4",
    "train.methods=['dpfpl']",
]


def _simulated_round_s(cfg, rounds: int) -> tuple[float, int]:
    """(median seconds per simulated round, length of the shared vector a client uploads)."""
    from pfpl.federation.context import Benchmark

    sim, _ = Benchmark(cfg).engine("dpfpl")
    sim.run_round()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sim.run_round()
        times.append(time.perf_counter() - start)
    length = sum(int(v[0].numel()) for v in sim.server.shared.values())
    return statistics.median(times), length


def _flower_rows(federation, configs: dict, work: Path, say) -> dict:
    rows = {}
    for label, c in configs.items():
        rounds = c.federation.rounds
        say(f"{label}: {rounds} rounds on {federation.supernodes} SuperNodes")
        job = {"config": json.loads(c.model_dump_json()), "run_dir": str(work / label.replace(" ", "-"))}
        flower = federation.run(job)["methods"]["dpfpl"]["flower"]
        rows[label] = {
            "round_s": flower["train_s"] / rounds,
            "secure_aggregation_s": flower["secure_aggregation_s"] / rounds,
            "secure_round_trips": flower.get("secure_round_trips", 0) / rounds,
        }
    return rows


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
        if cfg.federation.sync != "fedavg":
            raise BenchError("the Flower bench times one exchange per round: it needs federation.sync='fedavg'")
        secure_cfg = load_config(None, [*settings, "federation.secure_aggregation=true"])
        say("simulator: timed rounds")
        sim_s, length = _simulated_round_s(cfg, cfg.federation.rounds)
        with LocalFederation(supernodes, work / "cache") as federation:
            rows = _flower_rows(federation, {"flower": cfg, "flower + secure aggregation": secure_cfg}, work, say)
            say(f"Flower's SecAgg+ (legacy workflow): one round on a vector of {length}")
            job = {"length": length, "run_dir": str(work / "secaggplus")}
            flower_secagg = federation.run(job, apps="pfpl.benchmarks.flower_secaggplus")["round_s"]
        with LocalFederation(supernodes, work / "cache", fast=False) as federation:
            rows.update(_flower_rows(federation, {"flower, plain flower-supernode": cfg}, work, say))
    plain, secure = rows["flower"], rows["flower + secure aggregation"]
    return {
        "simulator_s_per_exchange": sim_s,
        "flower_s_per_exchange": plain["round_s"],
        "flower_secure_s_per_exchange": secure["round_s"],
        "flower_plain_supernode_s_per_exchange": rows["flower, plain flower-supernode"]["round_s"],
        "secure_over_plain": secure["round_s"] / plain["round_s"],
        "secure_round_trip_s": secure["secure_aggregation_s"] / max(secure["secure_round_trips"], 1e-12),
        "secure_round_trips_per_exchange": secure["secure_round_trips"],
        "simulator_round_s": sim_s,
        "rows": rows,
        "flower_over_simulator": plain["round_s"] / sim_s,
        "secure_share_of_flower_round": secure["secure_aggregation_s"] / secure["round_s"],
        "flower_secaggplus_round_s": flower_secagg,
        "vector_length": length,
        "supernodes": supernodes,
        "clients": cfg.federation.n_clients,
        "threads": torch.get_num_threads(),
        "note": "DP-FPL, FedAvg sync (one exchange per round); Flower time = the ServerApp's training rounds "
        "(SuperLink round trips, Flower's ClientApp process per message and the warm worker's answer "
        "included); 'flower' and 'secure' run pfpl's loopback SuperNodes (shortened waits), 'plain "
        "flower-supernode' Flower's defaults; Flower SecAgg+ = one legacy-workflow round of a random "
        "vector of the same length, one client per SuperNode",
    }


def format_flower(result: dict) -> str:
    lines = [
        f"{'path':<34} {'s/exchange':>10} {'secure agg s':>13}",
        f"{'simulator':<34} {result['simulator_s_per_exchange']:>10.3f}",
    ]
    for label, row in result["rows"].items():
        lines.append(f"{label:<34} {row['round_s']:>10.2f} {row['secure_aggregation_s']:>13.2f}")
    lines += [
        f"Flower / simulator: {result['flower_over_simulator']:.1f}×; secure / plain exchange: "
        f"{result['secure_over_plain']:.2f}× (secure aggregation: {result['secure_share_of_flower_round']:.0%} "
        f"of a secure exchange, {result['secure_round_trip_s']:.2f} s per round trip)",
        f"Flower's own SecAgg+ (legacy workflow), one round on {result['vector_length']} floats: "
        f"{result['flower_secaggplus_round_s']:.1f} s",
        f"{result['supernodes']} SuperNodes, {result['clients']} clients; {result['note']}",
    ]
    return "\n".join(lines)
