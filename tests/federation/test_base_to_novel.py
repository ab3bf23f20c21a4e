"""Base-to-novel and the paper's metric end to end: the held-out classes reach no party's training
data, and every method reports local / base / novel / hm in the summary, its CSV and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pfpl.algorithms import DEFAULT_METHODS
from pfpl.config import load_config
from pfpl.errors import ConfigError
from pfpl.federation.context import Benchmark
from pfpl.federation.runner import run

SMALL = [
    "federation.n_clients=5",
    "federation.rounds=1",
    "federation.local_steps=1",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module: every test's benchmark encodes the same tiny splits."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cfg_of(tmp_path, cache):
    def make(*extra: str):
        return load_config(None, [*SMALL, f"cache_dir='{cache}'", f"output_dir='{tmp_path}'", *extra])

    return make


@pytest.mark.parametrize("partition", ["pathological", "dirichlet", "domain_class"])
def test_no_novel_class_is_in_any_clients_training_data(cfg_of, partition):
    cfg = cfg_of("evaluation.novel_fraction=0.5", f"federation.partition='{partition}'")
    bench = Benchmark(cfg)
    labels = bench.train.labels.numpy()
    assert len(bench.novel) == 20
    for ix in bench.partition.clients:
        assert not np.isin(labels[ix], bench.novel).any()
    held = bench.client_data().held_classes(len(bench.dataset.classnames))
    assert not held[:, bench.novel].any()  # what the methods are told each client holds
    if partition != "domain_class":  # (which gives each client a subset of its domain's classes)
        assert held[:, np.setdiff1d(np.arange(40), bench.novel)].any(0).all()  # every base class is someone's


def test_fedsp_server_trains_on_neither_novel_classes_nor_more_than_its_share(cfg_of):
    from pfpl.federation.fedsp import server_rows

    cfg = cfg_of(
        "evaluation.novel_fraction=0.5",
        "train.methods=['fedsp']",
        "fedsp.server_per_class=1",
        "federation.sync='fedavg'",
    )
    bench = Benchmark(cfg)
    rows = server_rows(bench, "val", np.arange(len(bench.val)))
    labels = bench.val.labels.cpu().numpy()[rows]
    assert not np.isin(labels, bench.novel).any()
    assert sorted(labels.tolist()) == sorted(np.setdiff1d(np.arange(40), bench.novel).tolist())  # one per base class


@pytest.mark.parametrize(
    "methods",
    [
        ["coop", "promptfl"],
        pytest.param(list(DEFAULT_METHODS), marks=pytest.mark.slow, id="every-default-method"),
    ],
)
def test_run_reports_base_novel_hm_for_every_method(tmp_path, cfg_of, methods):
    cfg = cfg_of("evaluation.novel_fraction=0.5", f"train.methods={methods}")
    summary = run(cfg, tmp_path / "run")
    assert set(summary["methods"]) == set(methods)
    for m in [summary["zero_shot"], *summary["methods"].values()]:
        for key in ("local", "base", "novel", "hm"):
            assert 0 <= m[key] <= 1, key
        assert m["hm"] <= max(m["local"], m["base"], m["novel"])
    header = (tmp_path / "run" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"base", "novel", "hm"} <= set(header)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"base", "novel", "hm"} <= set(r) for r in rows)
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert len(partition["novel_classes"]) == 20
    held = {c for client in partition["clients"] for c in client["classes"]}
    assert not held & set(partition["novel_classes"])


@pytest.mark.parametrize(("report", "rounds"), [("final", 3), ("mean-last-10", 11)])
def test_the_reported_accuracy_is_the_final_round_or_the_mean_of_the_last_ten(tmp_path, cfg_of, report, rounds):
    cfg = cfg_of(f"federation.rounds={rounds}", "train.methods=['coop']", f"evaluation.report='{report}'")
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = rows[-1:] if report == "final" else rows[-10:]
    got = summary["methods"]["coop"]
    assert got["rounds_reported"] == len(kept)
    for key in ("local", "neighbor"):  # every client has both: the mean over clients commutes with rounds
        assert got[key] == pytest.approx(np.mean([r[key] for r in kept]), abs=1e-9)
    assert summary["setup"]["report"] == report
    if report == "mean-last-10":
        assert got["local"] != pytest.approx(rows[-1]["local"], abs=1e-9) or rows[-1]["local"] == rows[-2]["local"]


def test_held_out_domain_must_be_a_domain_of_the_dataset(cfg_of):
    with pytest.raises(ConfigError, match="not a domain of this dataset"):
        Benchmark(cfg_of("evaluation.held_out_domain='moon'"))


def test_the_group_prompt_view_scores_the_shared_prompt_alone(tmp_path, cfg_of):
    """A personalised method's summary carries its shared prompt's scores without the local part; a
    shared-only method's group view is its release; a local-only method has none."""
    from pfpl.federation.runner import run as run_all

    summary = run_all(cfg_of("train.methods=['coop', 'promptfl', 'fedotp-lite']"), tmp_path / "run")
    methods = summary["methods"]
    assert "group_prompt" not in methods["coop"]  # nothing shared
    assert methods["promptfl"]["group_prompt"]["local"] == pytest.approx(methods["promptfl"]["local"])
    view = methods["fedotp-lite"]["group_prompt"]
    assert 0 <= view["local"] <= 1 and view["local"] != methods["fedotp-lite"]["local"]


def test_leave_one_domain_out_trains_on_no_record_of_that_domain_and_scores_it(cfg_of):
    from pfpl.federation.fedsp import server_rows

    bench = Benchmark(
        cfg_of("evaluation.held_out_domain='sketch'", "federation.partition='domain'", "federation.sync='fedavg'")
    )
    sketch = bench.dataset.domainnames.index("sketch")
    domains = bench.train.domains.numpy()
    assert all(not (domains[ix] == sketch).any() for ix in bench.partition.clients)
    assert not (bench.val.domains.cpu().numpy()[server_rows(bench, "val", np.arange(len(bench.val)))] == sketch).any()
    out = bench.evaluate(bench.reference)
    split = bench.plan.shared["held_out_domain"]
    assert (bench.test.domains[split.index.to(bench.test.domains.device)] == sketch).all()
    assert 0 <= out["held_out_domain"] <= 1 and out["cross_domain"] is not None
