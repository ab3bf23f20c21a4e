"""``pfpl flower run``: one run on a real Flower federation on loopback — a SuperLink and N SuperNodes
started for it, the run submitted with ``flwr run``, everything shut down afterwards.

Every process is started in its own session, so stopping it stops what it spawned (Flower's
SuperExec and the per-message ClientApp / ServerApp processes); :class:`LocalFederation` stops them
all on leaving, whether the run finished, failed or was interrupted (Ctrl-C, SIGTERM). Ports are
chosen free at start. Flower's own files (its state, the app bundle it installs) live in a temporary
``FLWR_HOME``; the SuperNodes' feature cache and state snapshots live in the config's cache folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pfpl.errors import DeploymentError

CONNECTION = "pfpl-local"

APP_PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "pfpl-flower"
version = "0.1.0"
description = "pfpl on a Flower federation"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pfpl"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
job = ""
"""


# pfpl is installed where the apps run: never `uv sync` an app's dependencies at run time (offline).
LINK_FLAGS = ["--disable-runtime-dependency-installation"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower command from this interpreter's environment (they are installed beside it)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalFederation:
    """A SuperLink and ``supernodes`` SuperNodes on loopback, for ``with``."""

    def __init__(self, supernodes: int, cache_dir: Path, workdir: Path | None = None, start_timeout: float = 60.0):
        if supernodes < 1:
            raise DeploymentError(f"--supernodes must be at least 1, got {supernodes}")
        self.supernodes, self.cache_dir = supernodes, Path(cache_dir).resolve()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pfpl-flower-")
        self.workdir = Path(workdir or self._tmp.name)
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    # ---- processes ---------------------------------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ, FLWR_HOME=str(self.home))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it until it exits
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True, cwd=self.workdir
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    def __enter__(self) -> LocalFederation:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            link = self._start(
                "superlink", [_tool("flower-superlink"), "--insecure", "--port", str(self.port), *LINK_FLAGS]
            )
            deadline = time.time() + self.start_timeout
            while not _listening(self.port):
                if link.poll() is not None or time.time() > deadline:
                    raise DeploymentError(f"the SuperLink did not start: {self.log_tail('superlink', 2)}")
                time.sleep(0.2)
            for i in range(self.supernodes):
                node_config = f"partition-id={i} num-partitions={self.supernodes} cache-dir='{self.cache_dir}'"
                args = [_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
                self._start(f"supernode-{i}", [*args, "--port", str(free_port()), "--node-config", node_config])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
            _signal_group(proc, signal.SIGKILL)  # whatever it spawned goes too
        self.procs.clear()
        self._stop_stragglers()
        if hasattr(self, "_old_term"):
            signal.signal(signal.SIGTERM, self._old_term)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _stop_stragglers(self) -> None:
        """Flower starts some processes in sessions of their own (a ClientApp per message, the
        SuperExec); they carry our FLWR_HOME, so find them by it and stop them too."""
        marker = f"FLWR_HOME={self.home}\0".encode()
        deadline = time.time() + 10
        while (left := _processes_with_env(marker)) and time.time() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    # ---- one run -------------------------------------------------------------------------------------
    def run(self, job: dict, apps: str = "pfpl.federation.flower.apps") -> dict:
        """Submit the job with ``flwr run`` and wait for it; returns the run's summary. ``apps``: the
        module holding ``server_app`` and ``client_app`` (its server app writes ``job['result']``)."""
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(
            APP_PYPROJECT.format(serverapp=f"{apps}:server_app", clientapp=f"{apps}:client_app")
        )
        result = self.workdir / "result.json"
        result.unlink(missing_ok=True)
        job = {**job, "result": str(result), "supernodes": self.supernodes}
        job_file = self.workdir / "job.json"
        job_file.write_text(json.dumps(job))
        submit = [_tool("flwr"), "run", str(app), CONNECTION, "--run-config", f"job='{job_file}'", "--stream"]
        proc = self._start("flwr-run", submit)
        while proc.poll() is None:
            if result.exists():
                break
            time.sleep(0.5)
        deadline = time.time() + 10
        while not result.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if not result.exists():
            raise DeploymentError(
                f"the Flower run ended without a result; its log ends with:\n{self.log_tail('flwr-run', 8)}"
            )
        outcome = json.loads(result.read_text())
        if not outcome["ok"]:
            raise DeploymentError(outcome["error"])
        return outcome["summary"]


def _processes_with_env(marker: bytes) -> list[int]:
    """Live processes whose environment holds ``marker`` (Linux ``/proc``; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and marker in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
