"""``pfpl flower run --tls`` on loopback: the SuperLink serves TLS with a certificate signed by a CA
made for the run and admits only SuperNodes whose public key was registered with ``flwr supernode
register``; the run ends where the simulator does, an unregistered SuperNode and a plaintext client
are refused, the private keys are 0600 under the federation's FLWR_HOME, and nothing is left behind."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from flower_grid import SMALL, processes_mentioning, same

from pfpl.config import load_config
from pfpl.federation.flower.launch import CONNECTION, LocalFederation, _tool, node_keys
from pfpl.federation.runner import run

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc"),
]


def test_pfpl_flower_run_with_tls_equals_the_simulator_and_leaves_nothing_behind(
    flower_cache, tmp_path, monkeypatch, capsys
):
    """`pfpl flower run --tls`: 2 authenticated SuperNodes over TLS, one round; the summary equals the
    simulator's, and no process and no key material (the temporary FLWR_HOME) is left."""
    from pfpl.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the federation's FLWR_HOME lives here
    overrides = [*SMALL, f"cache_dir='{flower_cache}'", "federation.rounds=1", "federation.sync='fedavg'"]
    overrides += ["train.methods=['dpfpl']"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    out = tmp_path / "flower"
    code = main(["flower", "run", "--tls", "--supernodes", "2", "--out", str(out), "--json", *sets])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert processes_mentioning(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flower"]  # the FLWR_HOME (its keys) is gone
    simulated = run(load_config(None, overrides), tmp_path / "sim")
    same(summary, simulated)


def _plaintext_request(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/control/list-nodes", body=b"{}")
        conn.getresponse()
    finally:
        conn.close()


def _handshake(port: int, context: ssl.SSLContext, hostname: str) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=hostname),
    ):
        pass


def test_an_unregistered_supernode_and_a_plaintext_client_are_refused(flower_cache, tmp_path, monkeypatch):
    """With a TLS federation of one registered SuperNode up: the private keys are 0600 under its
    FLWR_HOME; a plaintext HTTP client gets no answer; TLS verifies with the run's CA (for 127.0.0.1
    and localhost) and with nothing else; a SuperNode with a fresh, unregistered key is refused by the
    SuperLink (HTTP 412 on activation; the SuperNode exits with Flower's exit code 305) and
    `flwr supernode list` shows the registered node only; afterwards no process and no key is left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with LocalFederation(1, flower_cache, tls=True) as federation:
        home, port = federation.home, federation.port
        tls = home / "tls"
        intruder = node_keys(tls, "intruder")

        # key material: under FLWR_HOME, the folder and the private keys the owner's only
        assert stat.S_IMODE(tls.stat().st_mode) == 0o700
        paths = [federation.certs[k] for k in ("ca", "server_cert", "server_key")]
        paths += [p for n in federation.certs["nodes"] for p in n.values()]
        assert all(Path(p).parent == tls for p in paths)
        private = [federation.certs["server_key"], federation.certs["nodes"][0]["private"], intruder["private"]]
        for p in private:
            assert stat.S_IMODE(Path(p).stat().st_mode) == 0o600, p
        assert all(stat.S_IMODE(Path(p).stat().st_mode) & 0o077 == 0 for p in tls.glob("*.key"))

        # the refused SuperNode starts first: its start-up is the slow part of this test
        refused = federation.start_supernode(1, key=intruder["private"], partition=0)

        with pytest.raises((http.client.HTTPException, OSError)):  # plaintext: no HTTP answer
            _plaintext_request(port)
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not vouch for it
            _handshake(port, ssl.create_default_context(), "127.0.0.1")
        ca = ssl.create_default_context(cafile=federation.certs["ca"])
        _handshake(port, ca, "127.0.0.1")
        _handshake(port, ca, "localhost")

        try:
            code = refused.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the unregistered SuperNode was not refused: {federation.log_tail('supernode-1', 10)}")
        assert code != 0
        node_log = federation.log_tail("supernode-1", 40)
        assert "Exit Code: 305" in node_log and "Failed to activate SuperNode" in node_log, node_log
        link_log = federation.log_tail("superlink", 200)
        assert "No SuperNode found with the given public key" in link_log
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_log

        listing = subprocess.run(
            [_tool("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=federation._env(),
            cwd=federation.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr
        registered = federation.log_tail("register-0", 5)  # "✅ SuperNode <id> registered successfully."
        nodes = json.loads(listing.stdout)["nodes"]
        assert [n["node-id"] for n in nodes] == [registered.split("SuperNode ")[1].split()[0]]  # no intruder
    assert not home.exists()
    assert processes_mentioning(str(tmp_path)) == []
