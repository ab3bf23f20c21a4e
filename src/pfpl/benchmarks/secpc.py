"""``pfpl bench --secpc``: the cost of one SecPC secure clustering (client side, server side, bytes
per client) for n simulated clients, next to one FedAvg training round of SecFPP on n clients of the
embedded model, timed in the same run. The clustered vectors are 128-dimensional (the embedded
model's image features) around 5 planted groups, projected to ``secfpp.projection_dim`` = 64."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from pfpl.benchmarks.secagg import CLIENTS, training_round
from pfpl.secure.secpc import SecPCSettings, adjusted_rand_index, cluster


def clustering(n: int, dim: int = 128, groups: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, groups)))[0].T
    truth = np.arange(n) % groups
    features = centres[truth] + 0.02 * rng.standard_normal((n, dim))
    start = time.perf_counter()
    result, oracle = cluster(features, SecPCSettings(seed=seed), secure=True)
    wall = time.perf_counter() - start
    return {
        "clients": n,
        "wall_s": wall,
        "client_s": oracle.client_seconds,
        "server_s": oracle.server_seconds,
        "bytes_per_client": oracle.bytes_per_client,
        "lcc_rounds": oracle.rounds,
        "clusters": int(result.assignment.max()) + 1,
        "ari": adjusted_rand_index(result.assignment, truth),
    }


def run_secpc_bench(clients=CLIENTS, log: Callable[[str], None] | None = None) -> dict:
    say = log or (lambda message: None)
    rows = []
    for n in clients:
        say(f"secure clustering of {n} clients")
        row = clustering(n)
        say(f"SecFPP training round with {n} clients")
        row["fedavg_round_s"] = training_round(n, method="secfpp")
        row["ratio_to_round"] = row["wall_s"] / row["fedavg_round_s"]
        rows.append(row)
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "note": "one CPU simulates every client and the server; the round is SecFPP's, 5 local steps",
    }


def format_secpc(result: dict) -> str:
    lines = [
        f"{'clients':>7} {'clustering s':>12} {'client s':>9} {'server s':>9} {'LCC rounds':>10} "
        f"{'kB/client':>9} {'k':>3} {'ARI':>5} {'round s':>8} {'ratio':>6}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['clients']:>7} {r['wall_s']:>12.3f} {r['client_s']:>9.4f} {r['server_s']:>9.3f} "
            f"{r['lcc_rounds']:>10} {r['bytes_per_client'] / 1e3:>9.1f} {r['clusters']:>3} {r['ari']:>5.2f} "
            f"{r['fedavg_round_s']:>8.3f} {r['ratio_to_round']:>6.2f}"
        )
    lines.append(result["note"])
    return "\n".join(lines)
