"""``pfpl bench`` on a tiny random open_clip model: the report's schema, and a cross-check that the
engine and the reference compute pattern give the same features, gradients and round (no timings
are asserted)."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import open_clip
import pytest
import torch

from pfpl.benchmarks.settings import JSON_KEYS, BenchConfig
from pfpl.benchmarks.workload import Workload
from pfpl.cli import main
from pfpl.streams import Streams

TOL = 1e-5


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to 1e-5 of the tensors' scale (gradients of a random tiny CLIP reach ~30; float32 rounding
    of the two compute orders differs by ~1e-6 of that)."""
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= TOL * scale, (float((a - b).abs().max()), scale)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_name(tmp_path, tiny_config) -> str:
    name = f"pfpl-bench-tiny-{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_config))
    open_clip.add_model_config(path)
    return name


def small(name: str, **kw) -> BenchConfig:
    base = dict(
        backbone=name, clients=3, classes_per_client=2, batch_size=4, n_ctx=4, rank=2, steps=1, repeats=1, peak_size=128
    )
    return BenchConfig(**{**base, **kw})


def test_json_schema_and_ratios(tiny_name, capsys):
    assert (
        main(
            [
                "bench",
                "--backbone",
                tiny_name,
                "--clients",
                "3",
                "--classes-per-client",
                "2",
                "--batch-size",
                "4",
                "--n-ctx",
                "4",
                "--rank",
                "2",
                "--steps",
                "2",
                "--repeats",
                "2",
                "--reference-clients",
                "2",
                "--peak-size",
                "128",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    for key in JSON_KEYS + ("text_tower_s_per_step", "text_tower_gflop_per_step", "workload"):
        assert key in result, key
    for key in (
        "speedup",
        "engine_s_per_round",
        "reference_s_per_round",
        "gflops",
        "peak_gflops",
        "text_tower_fraction_of_peak",
        "text_tower_gflop_per_step",
    ):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["reference_clients_timed"] == 2
    assert result["reference_s_per_round"] == pytest.approx(result["reference_s_measured"] * 3 / 2)
    # FlopCounterMode's count (CPU flash attention included) agrees with the analytic formula
    assert result["text_tower_gflop_per_step_without_prefix_sharing"] == pytest.approx(
        result["text_tower_gflop_per_step_analytic"], rel=1e-6
    )
    assert result["text_tower_gflop_per_step"] < result["text_tower_gflop_per_step_without_prefix_sharing"]
    wl = result["workload"]
    assert (wl["clients"], wl["classes"], wl["steps"], wl["image_size"]) == (3, 6, 2, [32, 32])
    assert wl["engine_text_positions"] < wl["reference_text_positions"] == 77


def test_printed_table(tiny_name, capsys):
    assert (
        main(
            [
                "bench",
                "--backbone",
                tiny_name,
                "--clients",
                "2",
                "--classes-per-client",
                "2",
                "--batch-size",
                "2",
                "--n-ctx",
                "2",
                "--rank",
                "1",
                "--repeats",
                "1",
                "--peak-size",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for word in ("engine", "reference", "speedup", "GFLOP/s", "peak", tiny_name):
        assert word in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clients", "0"], "--clients: must be a positive integer"),
        (["--repeats", "x"], "--repeats: must be a positive integer"),
    ],
)
def test_bad_numbers_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clients", "2", "--reference-clients", "3"], "--reference-clients must be between 1 and --clients"),
        (["--n-ctx", "2", "--rank", "4"], "--rank 4 must be at most --n-ctx 2"),
        (["--backbone", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_requests_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pfpl:") and message in err and "\n" not in err


def test_engine_and_reference_compute_the_same_thing(tiny_name):
    w = Workload.build(small(tiny_name, clients=3, classes_per_client=3, batch_size=5, n_ctx=4, rank=2, steps=2))
    engine, reference = w.engine(), w.reference()
    n = w.cfg.clients
    assert w.engine_positions < w.reference_positions == 77
    assert reference.one_client_calls and not engine.one_client_calls

    # image features: precomputed once == the image tower re-run on a client's batch
    for c in range(n):
        assert_same(w.features[c * 5 : (c + 1) * 5], w.backbone.encode_images(w.images[c * 5 : (c + 1) * 5]))

    # text features: one truncated call for all clients == one full-length call per client
    ctx = engine.personalized_context()
    together = w.engine_tower(ctx[:, None])
    for c in range(n):
        assert_same(together[c], w.reference_tower(ctx[c : c + 1, None])[0])

    # one step's gradients (same prompts, same streams): all clients at once == one at a time, images re-encoded
    everyone = torch.arange(n)
    params = {**engine.server.broadcast(everyone), **engine.local}
    batch = engine.data.batches(everyone, 1, 5, "shuffle", Streams(w.cfg.seed), 0)[0]
    norm = torch.full((n,), 5.0)
    grads, loss = engine.update.gradients(params, everyone, batch, norm, 0, 0, engine.streams)
    for c in range(n):
        one = torch.tensor([c])
        ref_batch = reference.data.batches(one, 1, 5, "shuffle", Streams(w.cfg.seed), 0)[0]
        ref_params = {**reference.server.broadcast(one), **{k: v[one] for k, v in reference.local.items()}}
        ref_grads, ref_loss = reference.update.gradients(ref_params, one, ref_batch, norm[:1], 0, 0, reference.streams)
        assert_same(loss[c], ref_loss[0])
        assert set(ref_grads) == set(grads) == {"global", "local"}
        for name in grads:
            assert grads[name][c].abs().max() > 0
            assert_same(grads[name][c], ref_grads[name][0])

    # whole rounds (2 steps, global synced every step) leave the same parameters
    for _ in range(2):
        engine.run_round()
        reference.run_round()
    for name in engine.params:
        assert_same(engine.params[name], reference.params[name])


def test_secagg_bench_reports_each_role_and_a_share_of_the_round(capsys):
    from pfpl.benchmarks.secagg import format_secagg, run_secagg_bench

    result = run_secagg_bench(clients=(6,), failure_clients=(12,))
    rows = result["rows"]
    (failure,) = result["failures"]  # the event covering every failure, beside the bound it was chosen by
    assert failure["clients"] == 12 and failure["protocol_rate"] is None
    assert 0 <= failure["event_rate"] <= failure["bound"] + 4 * (failure["bound"] / failure["event_draws"]) ** 0.5
    assert {(r["vector"], r["graph"]) for r in rows} == {
        (v, g) for v in ("embedded 16×64", "ViT-B-16 16×512") for g in ("sparse", "full")
    }
    for r in rows:
        assert r["wall_s"] > 0 and r["server_s"] > 0 and r["client_s_max"] >= r["client_s_mean"] > 0
        assert r["bytes_per_client"] > r["length"] * 8  # at least the masked vector itself
    trained = [r for r in rows if r["share_of_fedavg_round"] is not None]
    assert trained and all(0 < r["share_of_fedavg_round"] < 1 for r in trained)
    assert "server s" in format_secagg(result)


def test_secpc_bench_reports_each_role_and_a_ratio_to_the_round():
    from pfpl.benchmarks.secpc import format_secpc, run_secpc_bench

    result = run_secpc_bench(clients=(10,))
    (row,) = result["rows"]
    assert row["clusters"] == 5 and row["ari"] == 1.0  # the planted groups are found
    assert row["client_s"] > 0 and row["server_s"] > 0 and row["lcc_rounds"] >= 2 and row["bytes_per_client"] > 0
    assert row["ratio_to_round"] == pytest.approx(row["wall_s"] / row["fedavg_round_s"])
    assert "LCC rounds" in format_secpc(result)


def test_fedsp_bench_times_both_clients_side_by_side(tmp_path):
    from pfpl.benchmarks.fedsp import format_fedsp, run_fedsp_bench

    tiny = (
        "federation.n_clients=3",
        "data.train_per_class_domain=1",
        "data.val_per_class_domain=1",
        "data.test_per_class_domain=1",
        "prompt.n_ctx=2",
        "train.rank=1",
        f"cache_dir='{tmp_path / 'cache'}'",
    )
    result = run_fedsp_bench(rounds=1, overrides=tiny)
    fedsp, promptfl = result["rows"]["fedsp-nokd"], result["rows"]["promptfl"]
    assert fedsp["client_s_per_round"] > 0 and promptfl["client_s_per_round"] > 0
    assert fedsp["server_phase_s_per_round"] > 0 and promptfl["server_phase_s_per_round"] == 0  # PromptFL has none
    assert result["ratio"] == pytest.approx(fedsp["client_s_per_round"] / promptfl["client_s_per_round"])
    assert result["bytes_per_round"]["upload"] == 2 * 64 * 4 and result["bytes_per_round"]["body_once"] > 0
    assert 0 < result["parameters"]["auxiliary_transformer_share"] <= 0.5
    assert "FedSP client / PromptFL client" in format_fedsp(result)


def test_scaling_bench_splits_clients_by_the_budget_and_reports_each_row(tmp_path):
    from pfpl.benchmarks.scaling import format_scaling, run_scaling_bench, scaled_clients

    tiny = (
        "data.train_per_class_domain=1",
        "data.val_per_class_domain=1",
        "data.test_per_class_domain=1",
        "prompt.n_ctx=2",
        "train.rank=1",
        "train.max_sequences=80",  # two clients' 40 classes per call
        f"cache_dir='{tmp_path / 'cache'}'",
    )
    result = run_scaling_bench(clients=(3, 6), steps=1, repeats=1, overrides=tiny)
    rows = result["rows"]
    assert [(r["clients"], r["max_sequences"], r["calls_per_step"]) for r in rows] == [
        (3, 80, 2),
        (6, 80, 3),
        (6, 240, 1),  # the largest count again, in one call
    ]
    for r in rows:
        assert r["s_per_round"] > 0 and r["peak_rss_mib"] >= r["rss_before_training_mib"] > 0
        assert r["ms_per_client_step"] == pytest.approx(1e3 * r["s_per_round"] / r["clients"])
    spread = max(r["ms_per_client_step"] for r in rows[:2]) / min(r["ms_per_client_step"] for r in rows[:2])
    assert result["client_step_spread"] == pytest.approx(spread)
    assert "ms/client-step" in format_scaling(result)

    labels = np.repeat(np.arange(40), 5)
    clients = scaled_clients(labels, 7, classes=4, records=12)
    assert len(clients) == 7 and all(len(c) == 12 and len(np.unique(labels[c])) <= 4 for c in clients)
    assert len({tuple(c) for c in clients}) == 7  # clients differ
