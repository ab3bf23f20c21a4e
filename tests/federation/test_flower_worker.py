"""The warm worker (``pfpl.federation.flower.worker``): the thin ClientApp's imports, the wire format,
a federation answered through real worker processes equal to one answered in process, and what
happens when a worker dies, goes stale, idles out or loses its SuperNode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_grid import InProcessGrid, job, same, small_cfg
from flwr.app import ConfigRecord, Context, Message, RecordDict

from pfpl.federation.flower import worker as W
from pfpl.federation.flower.apps import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAVY = ("torch", "open_clip", "pfpl.config", "pfpl.federation.flower.records", "pfpl.federation.flower.node")


def test_the_thin_client_app_imports_no_numerical_stack():
    """What Flower imports for every message: flwr, the standard library and pfpl.errors — not torch,
    open_clip or pfpl's config and engine (those live in the warm worker)."""
    code = (
        "import sys, time; t = time.perf_counter(); import pfpl.federation.flower.apps as a; "
        "dt = time.perf_counter() - t; import json; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(json.dumps({'s': dt, 'heavy': heavy, 'app': type(a.client_app).__name__}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["app"] == "ClientApp"


def test_frames_round_trip_and_malformed_bytes_are_refused():
    a, b = socket.socketpair()
    with a, b:
        W.send_frames(a, [b"{}", b"", b"x" * 100_000])
        assert W.recv_frames(b) == [b"{}", b"", b"x" * 100_000]
        a.sendall(b"NOPE" + b"\0" * 4)
        with pytest.raises(W.WorkerError, match="not a pfpl worker frame"):
            W.recv_frames(b)
        a.sendall(W.MAGIC + (W.MAX_FRAMES + 1).to_bytes(4, "big"))
        with pytest.raises(W.WorkerError, match="frames"):
            W.recv_frames(b)
        a.sendall(W.MAGIC + (1).to_bytes(4, "big") + (W.MAX_FRAME + 1).to_bytes(8, "big"))
        with pytest.raises(W.WorkerError, match="a frame of"):
            W.recv_frames(b)
        a.sendall(W.MAGIC + (1).to_bytes(4, "big") + (10).to_bytes(8, "big") + b"short")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(W.WorkerError, match="closed after 5 of 10"):
            W.recv_frames(b)
    with pytest.raises(W.WorkerError, match="wire version"):
        W.decode_request([json.dumps({"version": 99, "op": "message"}).encode(), b"", b""])
    with pytest.raises(W.WorkerError, match="malformed request"):
        W.decode_request([json.dumps({"version": W.WIRE_VERSION, "op": "message"}).encode(), b"\xff\xff", b"\x01"])


def _identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # a ServerApp's, to make messages


def test_a_message_and_its_context_survive_the_wire_exactly():
    from pfpl.federation.flower import records as R

    _identity()
    state = RecordDict()
    state.config_records["pfpl/config"] = ConfigRecord({"json": '{"a": 1}', "n": 3, "x": 0.5, "ok": True})
    state.array_records["p"] = R.to_arrays({"w": __import__("torch").arange(6.0).reshape(2, 3)})
    context = Context(1, 7, {"partition-id": 0, "num-partitions": 3, "cache-dir": "/c"}, state, {"job": "j"})
    content = RecordDict({"pfpl": ConfigRecord({"version": 1, "round": 2})})
    msg = Message(content, dst_node_id=7, message_type="train.secagg")
    msg.metadata.__dict__["_message_id"] = "abc"
    head, m2, c2 = W.decode_request(W.encode_request(msg, context))
    assert m2.metadata.message_id == "abc" and m2.metadata.message_type == "train.secagg"
    assert dict(m2.content.config_records["pfpl"]) == {"version": 1, "round": 2}
    assert c2.node_config == context.node_config and c2.run_config == {"job": "j"} and c2.node_id == 7
    assert dict(c2.state.config_records["pfpl/config"]) == dict(state.config_records["pfpl/config"])
    assert R.from_arrays(c2.state.array_records["p"])["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


class Workers:
    """Workers started by a test (they watch this test process), stopped at the end."""

    def __init__(self):
        self.paths: set[Path] = set()

    def app(self, msg, context):
        context.node_config.setdefault("worker-idle-s", 120)
        self.paths.add(W.socket_path(context.node_config, os.getpid()))
        try:
            return W.exchange(msg, context, watch_pid=os.getpid())
        except W.WorkerError as err:
            from flwr.app import Error

            return Message(Error(code=W.WORKER_ERROR, reason=str(err)), reply_to=msg)

    def pids(self) -> dict[Path, int]:
        out = {}
        for p in self.paths:
            try:
                out[p] = W.ping(p, timeout=60)["pid"]
            except (OSError, W.WorkerError):  # none listens (a test killed it)
                continue
        return out

    def stop(self):
        for p, pid in self.pids().items():
            os.kill(pid, signal.SIGTERM)
            _wait(lambda p=p: not p.exists(), 20)


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop()


def _refused(path: Path) -> bool:
    s = W._try_connect(path)
    if s is None:
        return True
    s.close()
    return False


def _wait(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_federation_answered_by_warm_workers_ends_where_the_in_process_one_does(flower_cache, tmp_path, workers):
    """DP-FPL with secure aggregation and distributed DP, and PromptFL, on 3 nodes whose messages go
    through real worker processes (one per node, started by the first message): the same summary as
    the nodes answering in this process, one worker per node, each serving every message."""
    cfg = small_cfg(
        flower_cache,
        "train.methods=['dpfpl', 'promptfl']",
        "federation.secure_aggregation=true",
        "dp.mode='per-sample'",
        "dp.noise_multiplier=1.0",
        "dp.randomness='seeded'",
    )
    local = run_job(InProcessGrid(3, flower_cache), job(cfg, tmp_path / "local"))
    grid = InProcessGrid(3, flower_cache, app=workers.app)
    warm = run_job(grid, job(cfg, tmp_path / "warm"))
    same(warm, local, tol=0)
    pids = workers.pids()
    assert len(pids) == 3 and len(set(pids.values())) == 3
    assert sum(W.ping(p)["served"] for p in pids) == len(grid.sent)


def _node_context(cache: Path, **extra) -> Context:
    cfg = {"partition-id": 0, "num-partitions": 3, "cache-dir": str(cache), "worker-idle-s": 120, **extra}
    return Context(run_id=1, node_id=100, node_config=cfg, state=RecordDict(), run_config={})


def _hello(cfg) -> Message:
    from pfpl.federation.flower import records as R

    content = RecordDict()
    head = {"version": R.PROTOCOL_VERSION, "config": cfg.model_dump_json(), "num_partitions": 3}
    content.config_records[R.PFPL] = ConfigRecord(head)
    msg = Message(content, dst_node_id=100, message_type="query")
    msg.metadata.__dict__["_message_id"] = f"hello-{time.monotonic_ns()}"
    return msg


def test_a_killed_worker_costs_one_reply_and_the_next_message_starts_another(flower_cache, tmp_path, workers):
    _identity()
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']")
    context = _node_context(tmp_path / "cache")
    reply = workers.app(_hello(cfg), context)
    assert reply.has_content() and "pfpl/config" in context.state.config_records
    (path,) = workers.paths
    first = W.ping(path)["pid"]
    before = dict(context.state.config_records["pfpl/config"])

    os.kill(first, signal.SIGKILL)  # a stale socket is left behind
    _wait(lambda: _refused(path), 10)  # a killed process's threads close its files last, after it turns zombie
    assert path.exists()
    reply = workers.app(_hello(cfg), context)  # the next message replaces it
    assert reply.has_content(), reply.error.reason
    second = W.ping(path)["pid"]
    assert second != first and dict(context.state.config_records["pfpl/config"]) == before

    # a worker that dies while answering (stopped, then killed with the request in its socket): an
    # error reply naming its log, and the node's state left as it was
    context.state.config_records["marker"] = ConfigRecord({"v": 1})
    os.kill(second, signal.SIGSTOP)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(0.5); os.kill({second}, 9)"])
    reply = workers.app(_hello(cfg), context)
    killer.wait()
    assert reply.has_error() and reply.error.code == W.WORKER_ERROR and ".log" in reply.error.reason
    assert dict(context.state.config_records["marker"]) == {"v": 1}
    assert dict(context.state.config_records["pfpl/config"]) == before


def test_a_worker_exits_when_its_supernode_is_gone_or_after_its_idle_time(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = W.socket_path({"cache-dir": str(tmp_path), "partition-id": 0}, parent.pid)
        proc = W.start(watched, parent.pid)
        assert _wait(watched.exists, 30)
        assert W.ping(watched, timeout=120)["ok"]  # answered once its imports are done
        idle = W.socket_path({"cache-dir": str(tmp_path), "partition-id": 1}, os.getpid())
        idler = W.start(idle, os.getpid(), idle_s=1.0)
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=60) == 0 and not watched.exists()
        assert idler.wait(timeout=60) == 0 and not idle.exists()
        assert "idle for 1 s" in W.log_file(idle).read_text()
        assert f"process {parent.pid} is gone" in W.log_file(watched).read_text()
    finally:
        parent.kill()


def test_the_socket_folder_is_private_and_a_long_cache_path_falls_back_to_the_temporary_folder():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="c") as short:
        path = W.socket_path({"cache-dir": short}, 1)
        assert path.parent == Path(short).resolve() / "flower-workers"
        assert path.parent.stat().st_mode & 0o777 == 0o700
    long = W.socket_path({"cache-dir": str(Path(tempfile.gettempdir()) / ("x" * 120))}, 1)
    assert len(str(long)) <= W.SOCKET_PATH_MAX and long.parent.name == f"pfpl-workers-{os.getuid()}"
    one, other = ({"cache-dir": "/c", "partition-id": p} for p in (0, 1))
    assert W.socket_path(one, 1) != W.socket_path(other, 1) != W.socket_path(other, 2)
    assert W.enabled({}) and not W.enabled({"warm-worker": False}) and not W.enabled({"warm-worker": "off"})
