"""The Flower test harness: an in-process grid that carries real Flower messages between the server
driver and the ClientApp (every node keeps its own Context, as a SuperNode does), and small configs.
Imported by the Flower test modules (not a test module itself)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from pfpl.config import load_config
from pfpl.federation.flower.handlers import node_app

SMALL = [
    "federation.n_clients=5",
    "federation.rounds=2",
    "federation.local_steps=2",
    "data.train_per_class_domain=2",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=2",
    "prompt.n_ctx=4",
    "train.rank=2",
]


def _array(a) -> np.ndarray:
    try:
        return np.array(a.numpy())
    except Exception:  # a malformed Array (a test made it): its raw bytes
        return np.frombuffer(bytes(a.data), dtype=np.uint8).copy()


def snapshot(content: RecordDict) -> dict:
    """A reply's records as plain values: {"config": {name: {key: value}}, "array": {name: {key: ndarray}},
    "metric": {name: {key: value}}} (a copy: what the server received, kept after the run)."""
    return {
        "config": {k: dict(v) for k, v in content.config_records.items()},
        "array": {k: {n: _array(a) for n, a in v.items()} for k, v in content.array_records.items()},
        "metric": {k: dict(v) for k, v in content.metric_records.items()},
    }


class InProcessGrid:
    """Flower's Grid for a ServerApp, with the SuperNodes' ClientApp called in this process. ``down``:
    nodes that do not answer; ``meddle(kind, node, reply)``: may alter a reply on its way back;
    ``record``: keep every reply the server receives in ``replies`` as ``(kind, node, snapshot)``.
    The nodes run ``app`` (default ``node_app``, what a SuperNode's warm worker runs) at
    ``push_messages``; their replies wait for ``pull_messages``, as on a SuperLink."""

    def __init__(self, nodes: int, cache: Path, meddle=None, silent=None, record: bool = False, app=None):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": nodes, "cache-dir": str(cache)},
                state=RecordDict(),
                run_config={},
            )
            for i in range(nodes)
        }
        self.app = app or node_app  # app(message, context) -> reply: how a node answers
        self.down: set[int] = set()
        self.meddle = meddle
        self.silent = silent  # silent(kind, node, content) -> True: the node does not answer this one
        self.sent: list[tuple[str, int]] = []
        self.record = record
        self.replies: list[tuple[str, int, dict]] = []
        self._waiting: dict[str, object] = {}  # message id -> its reply, until pulled

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            m.metadata.__dict__["_message_id"] = mid = f"m{len(self.sent)}"
            ids.append(mid)
            self.sent.append((kind, node))
            if node in self.down or (self.silent and self.silent(kind, node, m.content)):
                # what a SuperLink answers once the node has stopped heart-beating
                self._waiting[mid] = create_message_error_unavailable_res_message(m.metadata, "node_unavail")
                continue
            TaskIdentity.node_id = node
            try:
                reply = self.app(m, self.contexts[node])
            finally:
                TaskIdentity.node_id = 0
            if self.meddle and reply.has_content():
                self.meddle(kind, node, reply.content)
            if self.record and reply.has_content():
                self.replies.append((kind, node, snapshot(reply.content)))
            self._waiting[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._waiting.pop(mid) for mid in list(message_ids) if mid in self._waiting]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose environment mentions ``text`` (each Flower process gets FLWR_HOME)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def small_cfg(cache: Path, *extra):
    """The small benchmark with its feature cache in ``cache`` (the session's ``flower_cache``)."""
    return load_config(None, [*SMALL, f"cache_dir='{cache}'", *extra])


def job(cfg, run_dir, **extra):
    return {"config": json.loads(cfg.model_dump_json()), "run_dir": str(run_dir), "supernodes": 3, **extra}


def same(a: dict, b: dict, tol: float = 1e-5) -> None:
    for name in b["methods"]:
        x, y = a["methods"][name], b["methods"][name]
        for key in ("local", "neighbor"):
            assert x[key] == pytest.approx(y[key], abs=tol), (name, key)
            for u, v in zip(x["per_client"][key], y["per_client"][key]):
                assert u == pytest.approx(v, abs=tol), (name, key)
        assert x["epsilon_kind"] == y["epsilon_kind"], name
        for u, v in zip(x["epsilon_per_client"], y["epsilon_per_client"]):
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-9), name
