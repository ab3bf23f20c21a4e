"""``pfpl flower run``: one run on a real Flower federation on loopback — a SuperLink and N SuperNodes
started for it, the run submitted with ``flwr run``, everything shut down afterwards.

Every process is started in its own session, so stopping it stops what it spawned (Flower's
SuperExec and the per-message ClientApp / ServerApp processes); :class:`LocalFederation` stops them
all on leaving, whether the run finished, failed or was interrupted (Ctrl-C, SIGTERM), and with
them the SuperNodes' warm workers (:mod:`.worker`, which also exit on their own once their
SuperNode is gone). Ports are chosen free at start. Flower's own files (its state, the app bundle it
installs, the TLS material) live in a temporary ``FLWR_HOME``; the SuperNodes' feature cache, state
snapshots and worker sockets live in the config's cache folder.

Loopback-only shortcuts (``fast=True``, the default): Flower's SuperExecs poll for work every
``SUPEREXEC_POLL_S`` instead of every second (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), and the
SuperNodes run through :mod:`.supernode`, which caps the SuperNode's 3 s idle sleep and 0.5 s reply
polls. ``fast=False`` runs plain ``flower-supernode`` with Flower's defaults — what a deployment pays.

``tls=True``: the SuperLink serves TLS with a certificate for 127.0.0.1 / localhost signed by a CA
made for the run, and authenticates SuperNodes (``--enable-supernode-auth``): each SuperNode gets a
P-384 key pair, its public key is registered with ``flwr supernode register`` before it starts, and
a SuperNode whose key is not registered is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
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
from pfpl.federation.flower.supernode import FAST_ENV

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
SUPEREXEC_POLL_S = 0.02  # loopback: FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default: 1 s; its minimum 0.01 s)


def make_tls(folder: Path, supernodes: int) -> dict:
    """A CA, the SuperLink's certificate for 127.0.0.1 / localhost, and a P-384 key pair per SuperNode
    (OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
    register`` take them), in ``folder``; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # mkdir's mode is subject to the umask
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes, private: bool = False) -> str:
        if private:
            _write_private(path, data)
        else:
            path.write_bytes(data)
        return str(path)

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfpl loopback CA")])
    ca = cert("pfpl loopback CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    plain = serialization.NoEncryption()
    out = {
        "ca": write(folder / "ca.crt", ca.public_bytes(pem)),
        "server_cert": write(folder / "server.pem", server.public_bytes(pem)),
        "server_key": write(
            folder / "server.key",
            server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain),
            private=True,
        ),
        "nodes": [],
    }
    for i in range(supernodes):
        out["nodes"].append(node_keys(folder, f"node{i}"))
    return out


def node_keys(folder: Path, name: str) -> dict:
    """A SuperNode's authentication key pair (P-384, OpenSSH format) in ``folder``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return {"private": str(private), "public": str(public)}


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600 from the start: it is never briefly
    readable by others, as a write followed by a chmod would leave it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(data)


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

    def __init__(
        self,
        supernodes: int,
        cache_dir: Path,
        workdir: Path | None = None,
        start_timeout: float = 60.0,
        tls: bool = False,
        fast: bool = True,
    ):
        if supernodes < 1:
            raise DeploymentError(f"--supernodes must be at least 1, got {supernodes}")
        self.supernodes, self.cache_dir = supernodes, Path(cache_dir).resolve()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pfpl-flower-")
        # absolute: the flwr CLI's config.toml takes `root-certificates` as an absolute path only
        self.workdir = Path(workdir or self._tmp.name).resolve()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.start_timeout = start_timeout
        self.tls, self.fast = tls, fast
        self.certs: dict = {}
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    # ---- processes ---------------------------------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ, FLWR_HOME=str(self.home))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a loopback federation reports nothing to flower.ai
        env.setdefault("PFPL_WORKER_THREADS", str(max(1, (os.cpu_count() or 1) // self.supernodes)))
        if self.fast:
            env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
            env[FAST_ENV] = "1"  # the ServerApp then pulls replies without Flower's 1 s first back-off
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
        if self.tls:
            self.certs = make_tls(self.home / "tls", self.supernodes)
            security = f"root-certificates = {json.dumps(self.certs['ca'])}"  # a TOML string (absolute path)
        else:
            security = "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
        )
        self._old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            if self.tls:
                c = self.certs
                security_args = ["--ssl-ca-certfile", c["ca"], "--ssl-certfile", c["server_cert"]]
                security_args += ["--ssl-keyfile", c["server_key"], "--enable-supernode-auth"]
            else:
                security_args = ["--insecure"]
            link = self._start(
                "superlink", [_tool("flower-superlink"), *security_args, "--port", str(self.port), *LINK_FLAGS]
            )
            deadline = time.time() + self.start_timeout
            while not _listening(self.port):
                if link.poll() is not None or time.time() > deadline:
                    raise DeploymentError(f"the SuperLink did not start: {self.log_tail('superlink', 2)}")
                time.sleep(0.1)
            if self.tls:
                self.register([n["public"] for n in self.certs["nodes"]])
            for i in range(self.supernodes):
                self.start_supernode(i)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def register(self, public_keys: list[str]) -> None:
        """``flwr supernode register`` each public key with the SuperLink (node authentication)."""
        procs = [
            (key, self._start(f"register-{i}", [_tool("flwr"), "supernode", "register", key, CONNECTION]))
            for i, key in enumerate(public_keys)
        ]
        for i, (key, proc) in enumerate(procs):
            try:
                code = proc.wait(timeout=self.start_timeout)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                raise DeploymentError(f"registering SuperNode key {key} failed: {self.log_tail(f'register-{i}', 3)}")

    def start_supernode(self, i: int, key: str | None = None, partition: int | None = None) -> subprocess.Popen:
        """SuperNode ``i`` (partition ``partition``, default ``i``); with TLS it authenticates with
        ``key`` (default: the key registered for it)."""
        p = i if partition is None else partition
        node_config = f"partition-id={p} num-partitions={self.supernodes} cache-dir='{self.cache_dir}'"
        command = (
            [sys.executable, "-m", "pfpl.federation.flower.supernode"] if self.fast else [_tool("flower-supernode")]
        )
        if self.tls:
            key = key or self.certs["nodes"][i]["private"]
            security = ["--root-certificates", self.certs["ca"], "--auth-supernode-private-key", key]
        else:
            security = ["--insecure"]
        args = [*command, *security, "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())]
        return self._start(f"supernode-{i}", [*args, "--node-config", node_config])

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
        """Flower starts some processes in sessions of their own (the SuperExec's ClientApp and
        ServerApp processes), and so does a warm worker; they carry our FLWR_HOME, so find them by it
        and stop them too: SIGTERM first (a worker then removes its socket), SIGKILL after a moment."""
        marker = f"FLWR_HOME={self.home}\0".encode()
        for pid in _processes_with_env(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 12
        soft = time.time() + 2
        while (left := _processes_with_env(marker)) and time.time() < deadline:
            if time.time() > soft:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

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
            time.sleep(0.1)
        deadline = time.time() + 10
        while not result.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
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
