"""The Flower apps: ``client_app`` (a SuperNode's :class:`~pfpl.federation.flower.node.Node`) and
``server_app`` (:func:`pfpl.federation.runner.run` over :class:`~pfpl.federation.flower.driver.FlowerTraining`).
The project's ``[tool.flwr.app.components]`` names them.

The ServerApp reads its job from the JSON file named by the run config's ``job`` key: the pfpl config
(resolved), the run folder, ``resume`` / ``overwrite``, the number of SuperNodes and the timeouts
(``pfpl flower run`` writes it; ``pfpl flower job`` writes one for a deployment). It writes the
outcome — the summary, or the one-line error — to the job's ``result`` file.

A SuperNode's node config: ``partition-id`` and ``num-partitions`` (which clients it hosts),
optionally ``cache-dir`` (its feature cache and its state snapshots, default the config's).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pfpl.artifacts import atomic_write_text
from pfpl.errors import DeploymentError, PfplError, ProtocolError
from pfpl.federation.flower import records as R

log = logging.getLogger(__name__)

CONFIG_STATE = "pfpl/config"
ERROR_CODE = 4242  # pfpl's refusals (a ProtocolError, a bad config) as Flower error replies

client_app = ClientApp()
server_app = ServerApp()
_NODES: dict[tuple, object] = {}  # a process that serves several messages (tests, a warm worker) builds a node once


# ---- the SuperNode side ---------------------------------------------------------------------------
def _node(context: Context, config_json: str | None = None):
    from pfpl.config import build_config
    from pfpl.federation.flower.node import Node

    if config_json is None:
        if CONFIG_STATE not in context.state.config_records:
            raise ProtocolError("this SuperNode has no pfpl config for the run (the server must say hello first)")
        config_json = str(context.state.config_records[CONFIG_STATE]["json"])
    data = json.loads(config_json)
    cache = context.node_config.get("cache-dir")
    if cache:
        data["cache_dir"] = str(cache)
    try:
        partition_id = int(context.node_config["partition-id"])
        partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ProtocolError(f"the SuperNode's --node-config lacks {err.args[0]!r}") from None
    key = (json.dumps(data, sort_keys=True), partition_id, partitions)
    if key not in _NODES:
        cfg = build_config(data)
        while len(_NODES) >= 8:
            _NODES.pop(next(iter(_NODES)))
        _NODES[key] = Node(cfg, partition_id, partitions, Path(cfg.cache_dir) / "flower-state")
    return _NODES[key], partitions


def _answer(msg: Message, context: Context, work) -> Message:
    try:
        return Message(work(), reply_to=msg)
    except PfplError as err:
        log.warning("pfpl node: %s", err)
        return Message(Error(code=ERROR_CODE, reason=str(err)), reply_to=msg)
    except Exception as err:  # a bug: say what it was, keep the traceback in the node's log
        log.error("pfpl node: %s", traceback.format_exc())
        return Message(Error(code=ERROR_CODE + 1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


@client_app.query()
def hello(msg: Message, context: Context) -> Message:
    def work() -> RecordDict:
        head = R.header(msg.content)
        node, partitions = _node(context, str(head["config"]))
        if partitions != int(head["num_partitions"]):
            raise ProtocolError(
                f"this SuperNode is one of {partitions} partitions, the server expects {int(head['num_partitions'])}"
            )
        context.state.config_records[CONFIG_STATE] = ConfigRecord({"json": str(head["config"])})
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, **node.hello()})
        return reply

    return _answer(msg, context, work)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].train(msg.content, context.state))


@client_app.train("secagg")
def secure_aggregation(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].secure_aggregation(msg.content, context.state))


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].evaluate(msg.content, context.state))


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
