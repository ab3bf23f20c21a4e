"""The Flower apps: ``client_app`` (a SuperNode's :class:`~pfpl.federation.flower.node.Node`, through
its warm worker) and ``server_app`` (:func:`pfpl.federation.runner.run` over
:class:`~pfpl.federation.flower.driver.FlowerTraining`).
The project's ``[tool.flwr.app.components]`` names them.

The ServerApp reads its job from the JSON file named by the run config's ``job`` key: the pfpl config
(resolved), the run folder, ``resume`` / ``overwrite``, the number of SuperNodes and the timeouts
(``pfpl flower run`` writes it; ``pfpl flower job`` writes one for a deployment). It writes the
outcome — the summary, or the one-line error — to the job's ``result`` file.

A SuperNode's node config: ``partition-id`` and ``num-partitions`` (which clients it hosts),
optionally ``cache-dir`` (its feature cache and its state snapshots, default the config's), and the
warm worker's settings (:mod:`pfpl.federation.flower.worker`: ``warm-worker``, ``worker-idle-s``,
``worker-start-s``, ``worker-reply-s``).

``client_app`` is what Flower runs for every message, in a fresh process: it forwards the message to
the SuperNode's warm worker (:mod:`.worker`), which answers it with
:data:`pfpl.federation.flower.handlers.node_app`, in a process that keeps pfpl imported and the node
built. This module imports only the standard library, flwr, :mod:`pfpl.errors` and the worker's
client side (the server side imports pfpl inside ``run_job``), so the per-message ClientApp process
stays as cheap as Flower's own runtime.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pfpl.errors import DeploymentError, PfplError
from pfpl.federation.flower import worker

log = logging.getLogger(__name__)

client_app = ClientApp()  # what Flower runs: forwards to the node's warm worker (pfpl.federation.flower.handlers)
server_app = ServerApp()


# ---- the thin ClientApp ---------------------------------------------------------------------------
@client_app.query()
def forward_query(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


@client_app.train()
def forward_train(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


@client_app.train("secagg")
def forward_secure_aggregation(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


@client_app.query("phase")
def forward_server_phase(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


@client_app.query("model")
def forward_model(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


@client_app.evaluate()
def forward_evaluate(msg: Message, context: Context) -> Message:
    return worker.forward(msg, context)


# ---- the SuperLink side ---------------------------------------------------------------------------
def run_job(grid: Grid, job: dict) -> dict:
    """Train the job's run on the connected SuperNodes; returns the run's summary."""
    from pfpl.config import build_config
    from pfpl.federation.flower.driver import Cluster, FlowerTraining
    from pfpl.federation.flower.node import flower_refusal
    from pfpl.federation.runner import resume, run

    cfg = build_config(job["config"])
    for name in cfg.train.methods:
        why = flower_refusal(name)
        if why:
            raise DeploymentError(why)
    cluster = Cluster(grid, cfg, int(job["supernodes"]), float(job.get("timeout", 600)), float(job.get("wait", 120)))

    def training(bench, name):
        if not cluster.hosted:
            cluster.connect(bench)
        return FlowerTraining(cluster, bench, name)

    run_dir = Path(job["run_dir"])
    if job.get("resume"):
        return resume(run_dir, training=training)
    return run(cfg, run_dir, overwrite=bool(job.get("overwrite")), training=training)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    import os

    from pfpl.artifacts import atomic_write_text
    from pfpl.federation.flower.supernode import FAST_ENV, short_pull_backoff

    if os.environ.get(FAST_ENV) == "1":  # pfpl's loopback federation: replies pulled without a 1 s back-off
        short_pull_backoff()

    job_file = Path(str(context.run_config["job"]))
    job = json.loads(job_file.read_text())
    result = Path(job["result"])
    try:
        summary = run_job(grid, job)
        atomic_write_text(result, json.dumps({"ok": True, "summary": summary}))
    except PfplError as err:
        atomic_write_text(result, json.dumps({"ok": False, "error": str(err)}))
        raise
    except Exception as err:  # a bug: the launcher still gets one line, the traceback goes to the log
        log.error("pfpl server: %s", traceback.format_exc())
        atomic_write_text(result, json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}))
        raise
