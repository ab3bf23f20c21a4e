"""``pfpl bench --fedsp``: what a FedSP client pays against a PromptFL client that holds the full model,
timed side by side in one run on the embedded benchmark of ``configs/fedsp.toml`` (10 clients,
pathological split, 5 local steps per stage).

Each client runs its own update (one client per call, as on a client machine); the client seconds
per round are the round's time without server phases divided by the participants (the server's
averaging of 10 prompts is a few microseconds of it). FedSP's server fine-tuning is timed on its own.
FedSP runs undistilled here (``fedsp-nokd``): distillation changes the auxiliary body's values, not
its cost, and takes minutes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SETTINGS = [
    "federation.n_clients=10",
    "federation.partition='pathological'",
    "federation.sync='fedavg'",
    "federation.local_steps=5",
    "federation.rounds=4",
]


def _client_seconds(sim, rounds: int) -> tuple[float, float]:
    """(client seconds per participant per round, server-phase seconds per round), medians."""
    phases, sim.phases = sim.phases, []
    sim.one_client_calls = True
    sim.run_round()  # warm-up
    client, server = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        info = sim.run_round()
        client.append((time.perf_counter() - start) / max(1, info["participants"]))
        for phase in phases:
            start = time.perf_counter()
            phase(sim, sim.round)
            server.append(time.perf_counter() - start)
    return statistics.median(client), statistics.median(server) if server else 0.0


def run_fedsp_bench(rounds: int = 3, log: Callable[[str], None] | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """``overrides``: config ``key=value`` settings after the benchmark's own (tests make it tiny)."""
    from pfpl.config import load_config
    from pfpl.federation.context import Benchmark

    say = log or (lambda message: None)
    cfg = load_config(None, [*SETTINGS, "train.methods=['fedsp-nokd', 'promptfl']", *overrides])
    bench = Benchmark(cfg)
    rows = {}
    for name in ("promptfl", "fedsp-nokd"):
        say(f"{name}: {rounds} timed rounds")
        sim, _ = bench.engine(name)
        client_s, server_s = _client_seconds(sim, rounds)
        rows[name] = {"client_s_per_round": client_s, "server_phase_s_per_round": server_s}
    context = bench.fedsp(False)
    sim, _ = bench.engine("fedsp-nokd")
    prompt = int(sim.server.shared["prompt"][0].numel()) * 4
    body = sum(int(v[0].numel()) * 4 for k, v in sim.local.items() if k.startswith("body:"))
    return {
        "rows": rows,
        "ratio": rows["fedsp-nokd"]["client_s_per_round"] / rows["promptfl"]["client_s_per_round"],
        "parameters": context.report["parameters"],
        "bytes_per_round": {"download": prompt, "upload": prompt, "body_once": body},
        "threads": torch.get_num_threads(),
        "note": "one client per call; FedSP = fedsp-nokd (same cost as fedsp); round time without server phases",
    }


def format_fedsp(result: dict) -> str:
    p, b = result["parameters"], result["bytes_per_round"]
    lines = [f"{'method':<12} {'client s/round':>14} {'server phase s':>14}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:<12} {r['client_s_per_round']:>14.3f} {r['server_phase_s_per_round']:>14.3f}")
    lines += [
        f"FedSP client / PromptFL client: {result['ratio']:.2f}×",
        f"a FedSP client holds {p['auxiliary_transformer_share']:.1%} of the transformer parameters, "
        f"{p['auxiliary_share']:.1%} of all parameters",
        f"bytes per round: {b['download']} down, {b['upload']} up; the auxiliary body once: {b['body_once']}",
        result["note"],
    ]
    return "\n".join(lines)
