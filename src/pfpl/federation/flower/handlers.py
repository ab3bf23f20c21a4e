"""The SuperNode's message handlers (``node_app``): a :class:`~pfpl.federation.flower.node.Node` per
run config, answering hello, train, secure-aggregation and evaluate messages. They run in the
node's warm worker (:mod:`.worker`), or in the ClientApp process itself with ``warm-worker=false``
and in the tests' in-process grid; a process that serves several messages builds a node once."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from pfpl.errors import PfplError, ProtocolError

log = logging.getLogger(__name__)

CONFIG_STATE = "pfpl/config"
ERROR_CODE = 4242  # pfpl's refusals (a ProtocolError, a bad config) as Flower error replies

node_app = ClientApp()
_NODES: dict[tuple, object] = {}  # node config -> its Node: built once per process


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


@node_app.query()
def hello(msg: Message, context: Context) -> Message:
    from pfpl.federation.flower import records as R

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


@node_app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].train(msg.content, context.state))


@node_app.train("secagg")
def secure_aggregation(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].secure_aggregation(msg.content, context.state))


@node_app.query("phase")
def server_phase(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].phase(msg.content, context.state))


@node_app.query("model")
def receive_model(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].receive_model(msg.content))


@node_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, lambda: _node(context)[0].evaluate(msg.content, context.state))
