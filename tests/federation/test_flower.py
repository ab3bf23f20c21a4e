"""pfpl on Flower: the ClientApp and the server driver exchange real Flower messages through an
in-process grid (every node keeps its own Context, as a SuperNode does), so equivalence with the
simulator, reply checks, dead nodes and a restarted server are tested in seconds; one test starts a
real SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from flower_grid import SMALL, InProcessGrid, job, processes_mentioning, same, small_cfg
from flwr.app import RecordDict

from pfpl.config import load_config
from pfpl.errors import DeploymentError
from pfpl.federation.flower import records as R
from pfpl.federation.flower.apps import run_job
from pfpl.federation.flower.driver import Cluster, FlowerTraining
from pfpl.federation.runner import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "extra",
    [
        [],  # DP-FPL's step sync
        ["federation.sync='fedavg'", "federation.participation=0.6"],
        # private runs draw their noise from secrets of each party (they differ by design): the
        # comparison with the simulator takes the seeded experiment setting
        ["dp.mode='feature'", "dp.noise_multiplier=1.0", "dp.sampling='poisson'", "dp.randomness='seeded'"],
        ["federation.secure_aggregation=true", "federation.dropout=0.2", "federation.n_clients=8"],
        [
            "federation.secure_aggregation=true",
            "dp.mode='per-sample'",
            "dp.noise_multiplier=1.0",
            "dp.randomness='seeded'",
        ],
    ],
    ids=["step", "fedavg-partial", "feature-dp", "secagg-dropout", "secagg-distributed-dp"],
)
def test_a_flower_run_ends_where_the_simulator_does(flower_cache, tmp_path, extra):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl', 'promptfl']", *extra)
    grid = InProcessGrid(3, flower_cache)
    flower = run_job(grid, job(cfg, tmp_path / "flower"))
    simulated = run(cfg, tmp_path / "sim")
    same(flower, simulated)
    secure = {"train.secagg"} if cfg.federation.secure_aggregation else set()
    assert {kind for kind, _ in grid.sent} == {"query", "train", "evaluate"} | secure
    folder = tmp_path / "flower"
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.csv", "accuracy.png", "checkpoint.pt"):
        assert (folder / name).is_file(), name
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * cfg.federation.rounds


def _meddling(kind_wanted: str, node_wanted: int, how: str):
    done = []

    def meddle(kind, node, content: RecordDict) -> None:
        if kind != kind_wanted or node != node_wanted or done:
            return
        done.append(True)
        values = R.from_arrays(content.array_records[R.VALUES])
        name = next(iter(values))
        if how == "shape":
            values[name] = values[name][:, :-1]
        elif how == "nan":
            values[name] = values[name].clone()
            values[name].view(-1)[0] = math.nan
        elif how == "key":
            values["intruder"] = values.pop(name)
        elif how == "sizes":
            stats = R.from_arrays(content.array_records[R.STATS])
            stats["sizes"] = stats["sizes"] + 1
            content.array_records[R.STATS] = R.to_arrays(stats)
        content.array_records[R.VALUES] = R.to_arrays(values)

    return meddle


@pytest.mark.parametrize(
    "how, reason",
    [("shape", "has shape"), ("nan", "NaN"), ("key", "keys"), ("sizes", "training-set sizes")],
)
def test_a_malformed_reply_is_rejected_with_its_reason_and_not_aggregated(flower_cache, how, reason):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']", "federation.rounds=1")
    grid = InProcessGrid(3, flower_cache, meddle=_meddling("train", 101, how))
    from pfpl.federation.context import Benchmark

    bench = Benchmark(cfg)
    cluster = Cluster(grid, cfg, 3)
    cluster.connect(bench)
    training = FlowerTraining(cluster, bench, "dpfpl")
    upload = training.rounds.step(list(range(5)), 0, 0, 1, last=False)
    (rejected,) = cluster.rejected
    assert rejected["node"] == 101 and rejected["kind"] == "train" and reason in rejected["reason"]
    assert set(upload.clients.tolist()) == set(range(5)) - set(cluster.hosted[101])  # not aggregated
    assert all(bool(torch.isfinite(v).all()) for v in training.server.shared.values())


def test_a_supernode_that_stops_answering_leaves_the_round_to_the_others(flower_cache, tmp_path, caplog):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']", "federation.rounds=3")
    grid = InProcessGrid(3, flower_cache)
    seen = []

    def progress(method, done, total):
        seen.append(done)
        if done == 1:
            grid.down.add(102)  # gone after round 1, never back

    cluster = Cluster(grid, cfg, 3)

    def training(bench, name):
        if not cluster.hosted:
            cluster.connect(bench)
        return FlowerTraining(cluster, bench, name)

    summary = run(cfg, tmp_path / "run", progress=progress, training=training)
    assert seen == [1, 2, 3]
    gone = cluster.hosted[102]
    per_client = summary["methods"]["dpfpl"]["per_client"]["local"]
    assert all(per_client[c] is None for c in gone) and all(
        per_client[c] is not None for c in range(5) if c not in gone
    )
    assert any(r["node"] == 102 and "no reply" in r["reason"] for r in cluster.rejected)
    assert math.isfinite(summary["methods"]["dpfpl"]["local"])


def test_a_restarted_server_resumes_to_the_same_result(flower_cache, tmp_path):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl', 'promptfl']", "federation.rounds=3")
    whole = run_job(InProcessGrid(3, flower_cache), job(cfg, tmp_path / "whole"))

    class Crash(Exception):
        pass

    grid = InProcessGrid(3, flower_cache)
    cluster = Cluster(grid, cfg, 3)

    def training(bench, name):
        if not cluster.hosted:
            cluster.connect(bench)
        return FlowerTraining(cluster, bench, name)

    def crash(method, done, total):
        if method == "dpfpl" and done == 2:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "killed", progress=crash, training=training)
    # a new ServerApp (a new Flower run): the nodes' Flower state is gone, their snapshots are not
    fresh = InProcessGrid(3, flower_cache)
    resumed = run_job(fresh, job(cfg, tmp_path / "killed", resume=True))
    same(resumed, whole, tol=0)


def test_a_node_asked_for_the_wrong_round_answers_with_an_error(flower_cache):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']")
    grid = InProcessGrid(3, flower_cache)
    from pfpl.federation.context import Benchmark

    bench = Benchmark(cfg)
    cluster = Cluster(grid, cfg, 3)
    cluster.connect(bench)
    training = FlowerTraining(cluster, bench, "dpfpl")
    upload = training.rounds.step(list(range(5)), 1, 0, 1, last=False)  # round 1 before round 0
    assert len(upload.clients) == 0
    assert len(cluster.rejected) == 3 and all("holds no state" in r["reason"] for r in cluster.rejected)


def test_a_federation_missing_a_partition_is_refused(flower_cache, tmp_path):
    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']")
    with pytest.raises(DeploymentError, match="no SuperNode hosts client"):
        grid = InProcessGrid(3, flower_cache)
        for c in grid.contexts.values():  # every node claims to be one of 4: client 3 has no host
            c.node_config["num-partitions"] = 4
        run_job(grid, {**job(cfg, tmp_path / "a"), "supernodes": 3})


def _silent_at(phase: str, nodes: set[int], round: int = 0):
    """SuperNodes that stop answering at a secure-aggregation phase of a round's first exchange."""

    def silent(kind, node, content) -> bool:  # masked inputs ride on the train message
        if kind != ("train" if phase == "masked" else "train.secagg") or node not in nodes:
            return False
        entries = [R.secagg_entry(k) for k in content.config_records if k.startswith("secagg/")]
        return any(p == phase and exchange == (round, 0) for p, exchange, _, _ in entries)

    return silent


def test_secure_aggregation_goes_on_without_a_node_lost_mid_protocol_and_skips_an_exchange_below_the_threshold(
    flower_cache, tmp_path, monkeypatch
):
    """8 clients on 3 nodes, full graph, threshold ⌈0.6 · 8⌉ = 5. A node (3 clients) silent at the
    masked input: the 5 others' sum is unmasked and training goes on. Two nodes (6 clients) silent at
    the unmasking of round 1's first exchange: that instance cannot complete, so that exchange is
    skipped (the shared prompt is not stepped by it) and recorded, and the run completes every round."""
    from pfpl.federation.server import Server

    cfg = small_cfg(
        flower_cache,
        "train.methods=['dpfpl']",
        "federation.n_clients=8",
        "federation.secure_aggregation=true",
        "secure.graph='full'",
    )
    grid = InProcessGrid(3, flower_cache, silent=_silent_at("masked", {102}))
    summary = run_job(grid, job(cfg, tmp_path / "one-lost"))
    assert math.isfinite(summary["methods"]["dpfpl"]["local"])
    assert summary["methods"]["dpfpl"]["secure_failures"] == 0

    applied = []
    apply = Server.apply

    def spy(self, name, agg, touched, round_index):
        applied.append((round_index, bool(touched.any())))
        return apply(self, name, agg, touched, round_index)

    monkeypatch.setattr(Server, "apply", spy)
    grid = InProcessGrid(3, flower_cache, silent=_silent_at("unmask", {101, 102}, round=1))
    summary = run_job(grid, job(cfg, tmp_path / "two-lost"))
    result = summary["methods"]["dpfpl"]
    assert math.isfinite(result["local"]) and result["secure_failures"] == 1  # one shared parameter, one group
    rows = [json.loads(line) for line in (tmp_path / "two-lost" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and [r["secure_failures"] for r in rows] == [0, 1]
    steps = len(applied) // cfg.federation.rounds  # exchanges per round (step sync)
    assert applied[steps] == (1, False)  # round 1, step 0: not applied
    assert all(touched for i, (_, touched) in enumerate(applied) if i != steps)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc")
def test_pfpl_flower_run_on_loopback_equals_the_simulator_and_leaves_no_process(
    flower_cache, tmp_path, monkeypatch, capsys
):
    """The real thing: `pfpl flower run` starts a SuperLink and 3 SuperNodes on free loopback ports,
    DP-FPL and PromptFL train over two rounds (state kept in each SuperNode's context between
    messages), the summary equals the simulator's, and every process it started is gone."""
    import tempfile

    from pfpl.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the federation's FLWR_HOME lives here
    overrides = [*SMALL, f"cache_dir='{flower_cache}'", "federation.sync='fedavg'"]
    overrides += ["train.methods=['dpfpl', 'promptfl']"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    code = main(["flower", "run", "--supernodes", "3", "--out", str(tmp_path / "flower"), "--json", *sets])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    simulated = run(load_config(None, overrides), tmp_path / "sim")
    same(summary, simulated)
    assert (tmp_path / "flower" / "summary.json").is_file()
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc")
def test_a_killed_supernode_leaves_the_rounds_to_the_survivors(flower_cache, tmp_path):
    """A real SuperNode killed (SIGKILL) after round 1: the later rounds complete with the others'
    clients, its clients are reported unevaluated, and nothing is left running."""
    import signal
    import threading

    from pfpl.federation.flower.launch import LocalFederation

    cfg = small_cfg(flower_cache, "train.methods=['dpfpl']", "federation.sync='fedavg'", "federation.rounds=3")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with LocalFederation(3, flower_cache, workdir=tmp_path / "federation") as federation:
        victim = federation.procs[3]  # the SuperLink, then SuperNodes 0, 1, 2

        def kill_after_round_one():
            while not (metrics.exists() and metrics.read_text().strip()):
                time.sleep(0.2)
            os.killpg(victim.pid, signal.SIGKILL)

        threading.Thread(target=kill_after_round_one, daemon=True).start()
        summary = federation.run({**job(cfg, tmp_path / "run"), "timeout": 60})
    per_client = summary["methods"]["dpfpl"]["per_client"]["local"]
    gone = [c for c in range(5) if c % 3 == 2]
    assert all(per_client[c] is None for c in gone)
    assert all(per_client[c] is not None for c in range(5) if c not in gone)
    assert summary["methods"]["dpfpl"]["flower"]["rejected_replies"] >= 2
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["participants"] for r in rows] == [5, 5, 5]
    assert processes_mentioning(str(tmp_path / "federation")) == []


def test_the_projects_flower_app_section_is_valid_and_names_the_apps_pfpl_flower_run_uses():
    """`flwr run .` reads pyproject.toml's [tool.flwr.app]; it must name the apps the loopback
    launcher uses and pass Flower's own validation (components importable)."""
    import tomllib

    from flwr.common.config import validate_config

    from pfpl.federation.flower.launch import APP_PYPROJECT

    root = Path(__file__).parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(project, check_module=True, project_dir=root / "src")
    assert ok, errors
    apps = "pfpl.federation.flower.apps"
    launched = tomllib.loads(APP_PYPROJECT.format(serverapp=f"{apps}:server_app", clientapp=f"{apps}:client_app"))
    assert project["tool"]["flwr"]["app"]["components"] == launched["tool"]["flwr"]["app"]["components"]
    assert "job" in project["tool"]["flwr"]["app"]["config"]
