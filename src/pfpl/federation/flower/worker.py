"""The warm worker: one long-lived process per SuperNode that holds pfpl's imports, the feature
cache and the node's :class:`~pfpl.federation.flower.node.Node` objects, so that a Flower message
costs a round trip instead of a process start and pfpl's imports (DESIGN §7).

Flower runs every message in a fresh ``flwr-clientapp`` process. pfpl's ClientApp
(:data:`pfpl.federation.flower.apps.client_app`) is thin — its module imports only the standard
library, flwr and :mod:`pfpl.errors` — and forwards each message (its metadata and content, the
node's ``context.state``, node and run config) over a unix-domain socket to the node's worker, which
runs the real handlers (:data:`pfpl.federation.flower.handlers.node_app`) and sends back the reply and the
updated ``context.state``. The state stays Flower's: a worker keeps nothing a message does not bring
again (its Node objects are caches of what the run's config determines), so a worker that is
restarted or killed loses only its warm imports, and a SIGKILLed SuperNode or a new ServerApp behave
exactly as with one process per message.

**Processes.** The first message a SuperNode's ClientApp forwards starts the worker, detached (a
session of its own): ``python -m pfpl.federation.flower.worker --socket PATH --watch-pid PID``. One
worker serves one SuperNode: its socket is named by a digest of the node config, the watched
process (the ClientApp's parent, Flower's SuperExec, which lives as long as its SuperNode) and the
interpreter. Starting is serialised by a lock file beside the socket, so concurrent ClientApps start
one worker. The worker binds its socket first, then imports pfpl's numerical stack (a ClientApp that
connects meanwhile waits in the listen backlog), then serves one connection at a time — a SuperNode
handles one message at a time.

**Lifecycle.** The worker exits when the watched process is gone (its SuperNode stopped or was
killed), after ``worker-idle-s`` seconds (node config, default 900) without a message, or on
SIGTERM/SIGINT; it unlinks its socket first and, on an idle exit, still serves whatever had connected
before. A stale socket (a killed worker) is removed by the next ClientApp, which starts a new worker.

**Failure modes.** A worker that dies during a message closes the connection: the ClientApp answers
with a Flower error (``WORKER_ERROR``) naming the worker's log, the node's ``context.state`` is left
as it was (as for a crashed ClientApp), the server rejects that reply, and the next message starts a
new worker. A worker that cannot start within ``worker-start-s`` seconds (default 120) is reported
the same way. ``warm-worker=false`` in the node config runs the handlers in the ClientApp process
instead (Flower's own per-message isolation; slow, for debugging).

**Sockets and serialisation.** The socket lives in ``<cache-dir>/flower-workers/`` (the node
config's ``cache-dir``; a folder ``pfpl-workers-<uid>`` in the temporary directory when there is none
or the path is too long for a unix socket), a folder of mode 0700, the socket 0600; the worker also
checks its peer's user id (``SO_PEERCRED``). A request or reply is a few length-prefixed frames: a
JSON header and Flower's own protobuf encodings (``flwr.common.serde``) of the ``Context``, the
``Message`` and the state ``RecordDict`` — parsed, never unpickled. The worker's log is
``<socket>.log``; what the handlers log during a message is also returned and logged by the
ClientApp, so it still lands in the SuperNode's log.

**Flower's state race.** A SuperNode forwards a ClientApp's reply as soon as it is pushed, before
that ClientApp has pushed its updated ``context.state`` (flwr 1.41's ``_push_messages`` waits for
the reply only), so a message that follows at once can be handed the state from before the last
one. The worker stamps every state it returns (``pfpl/worker``: its id and the reply's number per
run and node) and answers a message carrying an older stamp of its own from the state it last
returned, with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message

log = logging.getLogger(__name__)

WORKER_ERROR = 4244  # a Flower error reply: the warm worker could not be reached or failed
WIRE_VERSION = 1
MAGIC = b"PFW1"
MAX_FRAMES = 8
MAX_FRAME = (1 << 31) - 1  # protobuf's own limit
SOCKET_PATH_MAX = 100  # AF_UNIX paths: 108 bytes on Linux, 104 on macOS
DEFAULT_IDLE_S = 900.0
DEFAULT_START_S = 120.0
DEFAULT_REPLY_S = 3600.0
STAMP = "pfpl/worker"  # ConfigRecord in context.state: which worker answered last, and its reply's number


class WorkerError(Exception):
    """The warm worker could not be reached, started, or answered malformed bytes."""


# ---- framing ---------------------------------------------------------------------------------------
def send_frames(sock: socket.socket, frames: list[bytes]) -> None:
    if len(frames) > MAX_FRAMES or any(len(f) > MAX_FRAME for f in frames):
        raise WorkerError(f"a message of {len(frames)} frames or a frame over {MAX_FRAME} bytes")
    head = MAGIC + struct.pack(">I", len(frames)) + b"".join(struct.pack(">Q", len(f)) for f in frames)
    sock.sendall(head)
    for f in frames:
        sock.sendall(f)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if k == 0:
            raise WorkerError(f"the connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frames(sock: socket.socket) -> list[bytes]:
    head = _recv_exact(sock, 8)
    if head[:4] != MAGIC:
        raise WorkerError("not a pfpl worker frame")
    (count,) = struct.unpack(">I", head[4:])
    if count > MAX_FRAMES:
        raise WorkerError(f"{count} frames (at most {MAX_FRAMES})")
    sizes = struct.unpack(f">{count}Q", _recv_exact(sock, 8 * count)) if count else ()
    if any(s > MAX_FRAME for s in sizes):
        raise WorkerError(f"a frame of {max(sizes)} bytes (at most {MAX_FRAME})")
    return [_recv_exact(sock, s) for s in sizes]


def _header(frame: bytes) -> dict:
    try:
        head = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise WorkerError(f"a malformed header: {err}") from None
    if not isinstance(head, dict):
        raise WorkerError("a malformed header: not an object")
    return head


def encode_request(message: Message, context: Context) -> list[bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    head = {"version": WIRE_VERSION, "op": "message", "message_id": message.metadata.message_id}
    return [
        json.dumps(head).encode(),
        context_to_proto(context).SerializeToString(),
        message_to_proto(message).SerializeToString(),
    ]


def decode_request(frames: list[bytes]) -> tuple[dict, Message | None, Context | None]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    if not frames:
        raise WorkerError("an empty request")
    head = _header(frames[0])
    if head.get("version") != WIRE_VERSION:
        raise WorkerError(f"wire version {head.get('version')!r}, this worker speaks {WIRE_VERSION}")
    if head.get("op") != "message":
        return head, None, None
    if len(frames) != 3:
        raise WorkerError(f"a message request of {len(frames)} frames (3 expected)")
    try:
        context = context_from_proto(ProtoContext.FromString(frames[1]))
        message = message_from_proto(ProtoMessage.FromString(frames[2]))
    except Exception as err:  # protobuf's DecodeError, or a value flwr's serde refuses
        raise WorkerError(f"a malformed request: {type(err).__name__}: {err}") from None
    message.metadata.__dict__["_message_id"] = str(head.get("message_id", ""))
    return head, message, context


# ---- where a node's worker listens -----------------------------------------------------------------
def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise WorkerError(f"{path} belongs to another user: the worker's socket cannot live there")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def socket_path(node_config: dict, watch_pid: int) -> Path:
    """The socket of the worker serving this node config for the process ``watch_pid``."""
    key = json.dumps(
        {"node": {str(k): node_config[k] for k in sorted(node_config)}, "watch": watch_pid, "python": sys.executable},
        sort_keys=True,
        default=str,
    )
    name = hashlib.sha256(key.encode()).hexdigest()[:20] + ".sock"
    cache = node_config.get("cache-dir")
    if cache:
        folder = Path(str(cache)).expanduser().resolve() / "flower-workers"
        if len(str(folder / name)) <= SOCKET_PATH_MAX:
            return _private_dir(folder) / name
    return _private_dir(Path(tempfile.gettempdir()) / f"pfpl-workers-{os.getuid()}") / name


def _option(node_config: dict, key: str, default: float) -> float:
    try:
        return float(node_config.get(key, default))
    except (TypeError, ValueError):
        raise WorkerError(f"node config {key}={node_config.get(key)!r} is not a number") from None


def enabled(node_config: dict) -> bool:
    value = node_config.get("warm-worker", True)
    return str(value).strip().lower() not in {"false", "0", "no", "off"}


# ---- the ClientApp side ----------------------------------------------------------------------------
def _try_connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except OSError:
        s.close()
        raise


def log_file(path: Path) -> Path:
    return path.with_suffix(".log")


def _tail(path: Path, lines: int = 6) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


def start(path: Path, watch_pid: int, idle_s: float = DEFAULT_IDLE_S) -> subprocess.Popen:
    """Start a worker for ``path`` (detached: its own session, its output in ``<socket>.log``)."""
    with open(log_file(path), "wb") as out:
        os.chmod(out.name, 0o600)
        args = ["--socket", str(path), "--watch-pid", str(watch_pid), "--idle-s", str(idle_s)]
        return subprocess.Popen(
            [sys.executable, "-m", __name__, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def connect(node_config: dict, watch_pid: int | None = None) -> tuple[socket.socket, Path]:
    """A connection to the node's worker, starting it if none listens."""
    watch = os.getppid() if watch_pid is None else watch_pid
    path = socket_path(node_config, watch)
    s = _try_connect(path)
    if s is not None:
        return s, path
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        s = _try_connect(path)  # another ClientApp started it meanwhile
        if s is not None:
            return s, path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead worker's socket
        proc = start(path, watch, _option(node_config, "worker-idle-s", DEFAULT_IDLE_S))
        deadline = time.monotonic() + _option(node_config, "worker-start-s", DEFAULT_START_S)
        while (s := _try_connect(path)) is None:
            if proc.poll() is not None:
                raise WorkerError(
                    f"the warm worker exited ({proc.returncode}) before listening: {_tail(log_file(path))}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerError(f"the warm worker did not listen within the start timeout ({log_file(path)})")
            time.sleep(0.005)
        return s, path


def exchange(message: Message, context: Context, watch_pid: int | None = None) -> Message:
    """Have the node's worker answer ``message``; ``context.state`` becomes the worker's updated state.
    Raises :class:`WorkerError` if the worker cannot be reached or fails (the state is then unchanged)."""
    from flwr.common.serde import message_from_proto, recorddict_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    sock, path = connect(context.node_config, watch_pid)
    with sock:
        sock.settimeout(_option(context.node_config, "worker-reply-s", DEFAULT_REPLY_S))
        try:
            send_frames(sock, encode_request(message, context))
            frames = recv_frames(sock)
        except (OSError, WorkerError) as err:
            raise WorkerError(
                f"the warm worker failed ({err}); its log: {log_file(path)}: {_tail(log_file(path))}"
            ) from None
    head = _header(frames[0])
    for level, line in head.get("log", []):
        log.log(int(level), "%s", line)
    if not head.get("ok"):
        raise WorkerError(f"the warm worker refused the message: {head.get('error', '?')}")
    if len(frames) != 3:
        raise WorkerError(f"a reply of {len(frames)} frames (3 expected)")
    try:
        state = recorddict_from_proto(ProtoRecordDict.FromString(frames[1]))
        reply = message_from_proto(ProtoMessage.FromString(frames[2]))
    except Exception as err:
        raise WorkerError(f"a malformed reply: {type(err).__name__}: {err}") from None
    context.state.clear()
    for key, record in state.items():
        context.state[key] = record
    return Message(reply.error if reply.has_error() else reply.content, reply_to=message)


def forward(message: Message, context: Context) -> Message:
    """The thin ClientApp's handler: the worker's reply, or a Flower error saying why there is none."""
    if not enabled(context.node_config):
        from pfpl.federation.flower.handlers import node_app

        return node_app(message, context)
    try:
        return exchange(message, context)
    except WorkerError as err:
        log.error("pfpl node: %s", err)
        return Message(Error(code=WORKER_ERROR, reason=str(err)), reply_to=message)


def ping(path: Path, timeout: float = 5.0) -> dict:
    """The worker's answer to a ping (its pid), or a WorkerError."""
    s = _try_connect(path)
    if s is None:
        raise WorkerError(f"no worker listens on {path}")
    with s:
        s.settimeout(timeout)
        send_frames(s, [json.dumps({"version": WIRE_VERSION, "op": "ping"}).encode()])
        return _header(recv_frames(s)[0])


# ---- the worker --------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a zombie is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    return True


def _same_user(conn: socket.socket) -> bool:
    if not hasattr(socket, "SO_PEERCRED"):
        return True  # not Linux: the socket's folder (0700) is the only guard
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


class _Collect(logging.Handler):
    """What the handlers log during one message, returned to the ClientApp."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 200:
            self.lines.append((record.levelno, self.format(record)))


class Worker:
    """The serving loop (``python -m pfpl.federation.flower.worker``)."""

    def __init__(self, path: Path, watch_pid: int | None, idle_s: float):
        self.path, self.watch_pid, self.idle_s = Path(path), watch_pid, idle_s
        self.stopping = False
        self.served = 0
        self.token = os.urandom(8).hex()  # names this worker's stamps
        self.latest: dict[tuple[int, int], tuple[int, bytes]] = {}  # (run, node) -> (stamp, state it returned)

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(16)
        self.inode = self.path.stat().st_ino
        # a process forked from here (a DataLoader's workers during feature extraction) must not keep
        # the listening socket open: a ClientApp would connect to it after this worker died, and wait
        os.register_at_fork(after_in_child=listener.close)
        return listener

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:  # not a successor's socket
                self.path.unlink()

    def serve(self) -> int:
        listener = self._bind()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        log.info("pfpl worker %d: listening on %s", os.getpid(), self.path)
        t0 = time.perf_counter()
        from pfpl.federation.flower import node as _node  # noqa: F401 - the warm imports
        from pfpl.federation.flower.handlers import node_app

        self.app = node_app
        threads = os.environ.get("PFPL_WORKER_THREADS")
        if threads:  # SuperNodes sharing one machine (pfpl's loopback federation) share its cores
            import torch

            torch.set_num_threads(max(1, int(threads)))
        log.info("pfpl worker: pfpl imported in %.2f s", time.perf_counter() - t0)
        last = time.monotonic()
        why = "stopped"
        try:
            while not self.stopping:
                with contextlib.suppress(InterruptedError):
                    ready, _, _ = select.select([listener], [], [], 0.5)
                if ready:
                    conn, _ = listener.accept()
                    self._serve_one(conn)
                    last = time.monotonic()
                elif self.watch_pid and not _alive(self.watch_pid):
                    why = f"process {self.watch_pid} is gone"
                    break
                elif time.monotonic() - last > self.idle_s:
                    why = f"idle for {self.idle_s:.0f} s"
                    self._unlink()
                    listener.setblocking(False)
                    while True:  # whoever connected before the socket went is still answered
                        try:
                            conn, _ = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        conn.setblocking(True)
                        self._serve_one(conn)
                    break
        finally:
            self._unlink()
            listener.close()
        log.info("pfpl worker %d: exits (%s) after %d messages", os.getpid(), why, self.served)
        return 0

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            if not _same_user(conn):
                log.warning("pfpl worker: refused a connection of another user")
                return
            conn.settimeout(60.0)  # a request arrives at once; a stalled peer does not hold the worker
            try:
                head, message, context = decode_request(recv_frames(conn))
            except (OSError, WorkerError) as err:
                log.warning("pfpl worker: a bad request: %s", err)
                with contextlib.suppress(OSError):
                    send_frames(conn, [json.dumps({"ok": False, "error": str(err)}).encode()])
                return
            if message is None:
                answer = {"ok": head.get("op") == "ping", "pid": os.getpid(), "served": self.served}
                if not answer["ok"]:
                    answer["error"] = f"unknown op {head.get('op')!r}"
                with contextlib.suppress(OSError):
                    send_frames(conn, [json.dumps(answer).encode()])
                return
            frames = self._answer(message, context)
            conn.settimeout(None)
            try:
                send_frames(conn, frames)
            except OSError as err:  # the ClientApp is gone (Flower stopped it): nothing to answer
                log.warning(
                    "pfpl worker: the reply to a %s message was not delivered: %s", message.metadata.message_type, err
                )

    def _current_state(self, context: Context) -> None:
        """Flower's SuperNode forwards a ClientApp's reply before that ClientApp has pushed its updated
        context, so a quick next message can be handed the state from before the last one. Each reply
        stamps the state (``STAMP``); a request carrying an older stamp of this worker gets the state
        this worker last returned instead."""
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        key = (int(context.run_id), int(context.node_id))
        if key not in self.latest:
            return
        seq, state = self.latest[key]
        stamp = context.state.config_records.get(STAMP)
        if stamp is None or str(stamp.get("worker")) != self.token or int(stamp.get("seq", -1)) >= seq:
            return
        log.warning(
            "pfpl worker: Flower handed over the node state of message %s, not %s: using the latest",
            stamp.get("seq"),
            seq,
        )
        fresh = recorddict_from_proto(ProtoRecordDict.FromString(state))
        context.state.clear()
        for name, record in fresh.items():
            context.state[name] = record

    def _answer(self, message: Message, context: Context) -> list[bytes]:
        from flwr.app import ConfigRecord
        from flwr.common.serde import message_to_proto, recorddict_to_proto

        collect = _Collect()
        root = logging.getLogger()
        root.addHandler(collect)
        t0 = time.perf_counter()
        try:
            self._current_state(context)
            reply = self.app(message, context)
            key = (int(context.run_id), int(context.node_id))
            seq = self.latest.get(key, (0, b""))[0] + 1
            context.state.config_records[STAMP] = ConfigRecord({"worker": self.token, "seq": seq})
            state = recorddict_to_proto(context.state).SerializeToString()
            self.latest[key] = (seq, state)
            while len(self.latest) > 64:
                self.latest.pop(next(iter(self.latest)))
            body = message_to_proto(reply).SerializeToString()
        except Exception as err:  # the app refused the message itself (an unknown message type)
            log.warning("pfpl worker: %s message failed: %s", message.metadata.message_type, err)
            head = {"ok": False, "error": f"{type(err).__name__}: {err}", "log": collect.lines}
            return [json.dumps(head).encode()]
        finally:
            root.removeHandler(collect)
        self.served += 1
        seconds = time.perf_counter() - t0
        log.info("pfpl worker: %s message in %.3f s", message.metadata.message_type, seconds)
        head = {"ok": True, "seconds": seconds, "log": collect.lines}
        return [json.dumps(head).encode(), state, body]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pfpl.federation.flower.worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", type=Path, required=True, help="unix socket to listen on")
    p.add_argument("--watch-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    p.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S, help="exit after this long without a message")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    return Worker(args.socket, args.watch_pid or None, args.idle_s).serve()


if __name__ == "__main__":
    sys.exit(main())
