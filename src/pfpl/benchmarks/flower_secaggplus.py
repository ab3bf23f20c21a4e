"""Flower's own SecAgg+ on a vector of pfpl's upload size, for ``pfpl bench --flower``'s comparison.

Flower ships SecAgg+ only on its legacy strategy path (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the client, one NumPyClient per SuperNode). This app runs one FedAvg round of
that workflow on a random vector of the job's ``length`` and writes the round's seconds to the job's
result file, as pfpl's own ServerApp does. It is a measurement app, not a training path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from pfpl.artifacts import atomic_write_text


class _VectorClient(NumPyClient):
    def __init__(self, seed: int):
        self.seed = seed

    def fit(self, parameters, config):
        rng = np.random.default_rng(self.seed)
        return [rng.uniform(-1.0, 1.0, size=parameters[0].shape).astype(np.float32)], 1, {}


def _client(context: Context):
    return _VectorClient(int(context.node_config.get("partition-id", 0))).to_client()


client_app = ClientApp(client_fn=_client, mods=[secaggplus_mod])
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    job = json.loads(Path(str(context.run_config["job"])).read_text())
    nodes, length = int(job["supernodes"]), int(job["length"])
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(length, dtype=np.float32)]),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    secagg = SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=max(2, (2 * nodes + 2) // 3))
    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
    seconds = time.perf_counter() - start
    atomic_write_text(Path(job["result"]), json.dumps({"ok": True, "summary": {"round_s": seconds}}))
