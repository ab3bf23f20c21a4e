"""``pfpl bench --secagg``: the cost of one SecAgg+ protocol round (client side and server side
separately, bytes per client) for n simulated clients and vector sizes of DP-FPL's global prompt,
sparse and full graph, next to one FedAvg training round of the engine on n clients of the embedded
model, timed in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from pfpl.benchmarks.flops import timed
from pfpl.secure.aggregator import SecureSettings
from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import run_in_memory

CLIENTS = (10, 100, 1000)
VECTORS = {"embedded 16×64": 16 * 64, "ViT-B-16 16×512": 16 * 512}
TRAINED = "embedded 16×64"  # the vector the timed training round shares
FULL_GRAPH_MAX = 100  # the full graph costs O(n²): 1000 clients would take minutes per round on a CPU


def protocol_round(
    n: int, length: int, graph: str, dropout: int = 0, seed: int = 0, settings: SecureSettings | None = None
) -> dict:
    """Time one protocol instance over n clients with random ring vectors of ``length`` (+1 count), with
    the degree and threshold pfpl's defaults choose for n (:func:`pfpl.secure.params.choose`)."""
    degree, threshold = (settings or SecureSettings(graph=graph)).params_for(n)
    rng = np.random.default_rng(seed)
    vectors = {c: rng.integers(0, 2**63, length + 1, dtype=np.uint64) for c in range(n)}
    drops = {int(c): "masked" for c in rng.choice(n, size=dropout, replace=False)} if dropout else {}
    start = time.perf_counter()
    t = run_in_memory(vectors, threshold, neighbours(list(range(n)), degree, seed), drops=drops)
    wall = time.perf_counter() - start
    client = list(t.client_seconds.values())
    return {
        "clients": n,
        "length": length,
        "graph": graph,
        "degree": degree,
        "threshold": threshold,
        "wall_s": wall,
        "client_s_mean": statistics.mean(client),
        "client_s_max": max(client),
        "server_s": t.server_seconds,
        "bytes_per_client": statistics.mean(t.bytes_sent.values()),
        "dropped": len(drops),
    }


def training_round(n: int, steps: int = 5, records: int = 32, seed: int = 0, method: str = "dpfpl") -> float:
    """Seconds of one FedAvg round of ``method`` (DP-FPL by default) on n clients of the embedded model
    (random features of ``records`` records over 4 classes each, batch 32, ``steps`` local steps)."""
    from pfpl.algorithms import get_method
    from pfpl.algorithms.base import MethodSettings
    from pfpl.backbones import PromptTower, load_backbone
    from pfpl.data.clients import ClientData
    from pfpl.data.features import Features
    from pfpl.federation.client import TrainSettings
    from pfpl.federation.simulator import Simulator

    backbone = load_backbone("embedded", device="cpu")
    classes = [f"class {i}" for i in range(40)]
    gen = torch.Generator().manual_seed(seed)
    dim = int(backbone.model.text_projection.shape[1])
    feats = torch.nn.functional.normalize(torch.randn(n * records, dim, generator=gen), dim=-1)
    labels = torch.tensor([(c * 4 + k % 4) % 40 for c in range(n) for k in range(records)])
    data = ClientData(
        Features(feats, labels, torch.zeros_like(labels)), [np.arange(c * records, (c + 1) * records) for c in range(n)]
    )
    settings = TrainSettings(rounds=2, local_steps=steps, batch_size=32, sync="fedavg", seed=seed, cosine=False)
    sim = Simulator(
        get_method(method)(MethodSettings(rank=8)),
        PromptTower(backbone, classes, 16),
        data,
        settings,
        backbone.logit_scale,
    )
    sim.run_round()  # warm-up
    return timed(sim.run_round, torch.device("cpu"))


#: failure-rate measurement: each client drops with this probability at a phase drawn from the four
FAILURE_DROPOUT = 0.2
PROTOCOL_INSTANCES = {10: 400, 30: 300, 100: 40}  # real protocol runs (the 1000-client one is minutes each)
EVENT_DRAWS = 20_000


def failure_rates(clients=(10, 30, 100, 1000), dropout: float = FAILURE_DROPOUT, seed: int = 0) -> list[dict]:
    """How often an instance cannot complete with pfpl's default parameters at ``dropout``: measured by
    running the protocol (n ≤ 100) and, for every n, the rate of the event that covers every failure
    — some client with fewer than t holders that never drop (when every client has t, every seed and
    key is rebuilt and no client-side check fires) — over many drawn drop patterns, beside the bound
    the parameters were chosen by (:func:`pfpl.secure.params.failure_bound`)."""
    from pfpl.secure import params
    from pfpl.secure.protocol import PHASES, SecureAggregationError

    out = []
    for n in clients:
        settings = SecureSettings(dropout=dropout)
        degree, t = settings.params_for(n)
        graph = neighbours(list(range(n)), degree, seed)
        rng = np.random.default_rng(seed + n)
        holders = np.array([sorted({c, *graph[c]}) for c in range(n)])  # [n, k + 1]
        alive = rng.random((EVENT_DRAWS, n)) >= dropout
        event = float(((alive[:, holders].sum(-1)) < t).any(-1).mean())
        measured, instances = None, PROTOCOL_INSTANCES.get(n, 0)
        if instances:
            vectors = {c: np.array([c], dtype=np.uint64) for c in range(n)}
            failed = 0
            for _ in range(instances):
                drops = {int(c): PHASES[int(rng.integers(0, 4))] for c in np.flatnonzero(rng.random(n) < dropout)}
                try:
                    run_in_memory(vectors, t, graph, drops=drops)
                except SecureAggregationError:
                    failed += 1
            measured = failed / instances
        out.append(
            {
                "clients": n,
                "dropout": dropout,
                "degree": degree,
                "threshold": t,
                "bound": params.failure_bound(n, degree, t, dropout),
                "event_rate": event,
                "event_draws": EVENT_DRAWS,
                "protocol_rate": measured,
                "protocol_instances": instances,
            }
        )
    return out


def run_secagg_bench(
    clients=CLIENTS, failure_clients=(10, 30, 100, 1000), log: Callable[[str], None] | None = None
) -> dict:
    say = log or (lambda message: None)
    say("failure rates at 20% dropout")
    failures = failure_rates(failure_clients)
    rows, rounds = [], {}
    for n in clients:
        say(f"training round with {n} clients")
        rounds[n] = training_round(n)
        for name, length in VECTORS.items():
            for graph in ("sparse", "full"):
                if graph == "full" and n > FULL_GRAPH_MAX:
                    continue
                say(f"protocol round: {n} clients, {name}, {graph} graph")
                row = protocol_round(n, length, graph)
                row["vector"] = name
                row["fedavg_round_s"] = rounds[n] if name == TRAINED else None
                row["share_of_fedavg_round"] = row["wall_s"] / (row["wall_s"] + rounds[n]) if name == TRAINED else None
                rows.append(row)
    return {
        "rows": rows,
        "failures": failures,
        "training_round_s": rounds,
        "threads": torch.get_num_threads(),
        "note": "one CPU simulates every client and the server; a deployment runs the clients in parallel, "
        "so its added latency is about server_s + client_s_max (+ network)",
    }


def format_secagg(result: dict) -> str:
    lines = [
        f"{'clients':>7} {'vector':<16} {'graph':<6} {'k':>4} {'all clients s':>13} {'client max s':>12} "
        f"{'server s':>9} {'kB/client':>9} {'FedAvg round s':>14} {'share':>6}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['clients']:>7} {r['vector']:<16} {r['graph']:<6} {r['degree']:>4} {r['wall_s']:>13.3f} "
            f"{r['client_s_max']:>12.4f} {r['server_s']:>9.3f} {r['bytes_per_client'] / 1e3:>9.1f} "
            + (
                f"{r['fedavg_round_s']:>14.3f} {r['share_of_fedavg_round']:>6.1%}"
                if r["fedavg_round_s"] is not None
                else f"{'—':>14} {'—':>6}"
            )
        )
    lines.append(result["note"])
    lines.append(f"failure per instance at {FAILURE_DROPOUT:.0%} dropout (defaults: degree k, threshold t):")
    lines.append(f"{'clients':>7} {'k':>4} {'t':>4} {'bound':>8} {'event':>8} {'protocol':>16}")
    for f in result.get("failures", []):
        measured = f"{f['protocol_rate']:.2%} of {f['protocol_instances']}" if f["protocol_rate"] is not None else "—"
        lines.append(
            f"{f['clients']:>7} {f['degree']:>4} {f['threshold']:>4} {f['bound']:>8.2%} {f['event_rate']:>8.2%} "
            f"{measured:>16}"
        )
    return "\n".join(lines)
