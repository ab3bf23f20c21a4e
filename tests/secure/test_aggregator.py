"""The engine's secure aggregator: equal to the plaintext aggregation within the fixed-point bound,
distributed noise of the planned size, runs that survive dropouts and fail cleanly below the
threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pfpl.messages import Contributions, WeightedMean
from pfpl.privacy.aggregation import ClientLevelDP
from pfpl.secure.aggregator import SecureAggregator, SecureSettings


def _contributions(n=7, dim=50, groups=None, n_groups=1, drops=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, dim, generator=gen) * 3
    sizes = torch.randint(5, 60, (n,), generator=gen).float()
    groups = torch.zeros(n, dtype=torch.long) if groups is None else groups
    return Contributions(values, sizes, torch.arange(n), groups, n_groups, round=2, step=1, drops=drops)


@pytest.mark.parametrize("graph", ["full", "sparse"])
def test_secure_mean_equals_the_weighted_mean_within_the_fixed_point_bound(graph):
    settings = SecureSettings(frac_bits=20, graph=graph)
    c = _contributions(n=12, groups=torch.tensor([0, 1] * 6), n_groups=2)
    secure = SecureAggregator(settings)(c, torch.Generator())
    plain = WeightedMean()(c, torch.Generator())
    bound = 2.0 ** -(settings.frac_bits + 1)  # |error| ≤ B / (2·2^f·Σn) ≤ 2^-(f+1)
    assert float((secure - plain).abs().max()) <= bound
    assert float((secure - plain).abs().max()) > 0  # it really went through the fixed-point ring


def test_clients_dropping_before_their_input_are_left_out_exactly_like_plaintext():
    drops = {20: ("share", 0), 21: ("masked", 0), 3: ("unmask", 0)}  # 20, 21 never delivered; 3 did
    c = _contributions(n=8, drops=drops)
    secure = SecureAggregator(SecureSettings(frac_bits=22, threshold=0.6, graph="full"))(c, torch.Generator())
    assert torch.allclose(secure, WeightedMean()(c, torch.Generator()), atol=2.0**-23)


def test_client_level_clipping_moves_to_the_clients():
    c = _contributions(n=6)
    c.expected = torch.tensor([6.0])
    secure = SecureAggregator(SecureSettings(frac_bits=22, graph="full"), weighting="equal", client_clip=1.0)
    plain = ClientLevelDP(WeightedMean(), clip=1.0)
    assert torch.allclose(secure(c, torch.Generator()), plain(c, torch.Generator()), atol=2.0**-22)


def test_distributed_noise_has_the_planned_size_and_no_party_adds_it_alone():
    """Zero contributions: the decoded mean is pure Skellam noise. Each of the n clients adds a share
    with 1/t of the variance the plan asks for, so the sum of n shares has n/t of it."""
    n, dim = 10, 20000
    c = Contributions(torch.zeros(n, dim), torch.full((n,), 20.0), torch.arange(n), torch.zeros(n, dtype=torch.long), 1)
    settings = SecureSettings(graph="full", threshold=0.6, noise_bits=12)
    agg = SecureAggregator(settings, noise_std=3.0)
    out = agg(c, torch.Generator())
    t = settings.threshold_for(n)
    expected = 3.0 * np.sqrt(n / t) / (20.0 * n)  # std of the sum's noise, over Σ n_i
    assert float(out.std()) == pytest.approx(expected, rel=0.03)
    assert t < n  # a share alone is smaller than the full noise


def _run_args(tmp_path, extra):
    args = []
    for s in [
        "federation.n_clients=6",
        "federation.rounds=2",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "data.train_per_class_domain=1",
        "data.val_per_class_domain=1",
        "data.test_per_class_domain=1",
        f"cache_dir='{tmp_path / 'cache'}'",
        "train.methods=['dpfpl']",
        "federation.dropout=0.2",
        *extra,
    ]:
        args += ["--set", s]
    return args


def test_a_dpfpl_run_with_secure_aggregation_and_dropouts_matches_the_plain_run(tmp_path, capsys):
    from pfpl.cli import main

    assert main(["run", "--json", "-q", "--out", str(tmp_path / "plain"), *_run_args(tmp_path, [])]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "run",
                "--json",
                "-q",
                "--out",
                str(tmp_path / "secure"),
                *_run_args(tmp_path, ["federation.secure_aggregation=true"]),
            ]
        )
        == 0
    )
    secure = json.loads(capsys.readouterr().out)
    for key in ("local", "neighbor"):
        assert secure["methods"]["dpfpl"][key] == pytest.approx(plain["methods"]["dpfpl"][key], abs=1e-6)


def test_too_few_survivors_fail_the_round_cleanly(tmp_path, capsys):
    from pfpl.cli import main

    args = _run_args(
        tmp_path,
        [
            "federation.secure_aggregation=true",
            "secure.threshold=1.0",
            "secure.graph='full'",
            "federation.dropout=0.5",
            "federation.rounds=3",
        ],
    )
    assert main(["run", "-q", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "threshold" in err
    metrics = tmp_path / "run" / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    assert done < 3
    if done:  # what finished is kept and can be resumed from
        from pfpl.artifacts import RunFolder

        assert RunFolder(tmp_path / "run").load_checkpoint()["current"]["sim"]["server"]["round"] == done


def test_a_private_secure_run_meets_its_target_under_distributed_dp(tmp_path, capsys):
    """Per-sample DP-FPL with global DP as Skellam shares: calibrated on the distributed accounting, the
    reported ε meets the target, and it needs more noise than the plaintext Gaussian accounting."""
    from pfpl.cli import main

    base = ["dp.mode='per-sample'", "dp.target_epsilon=3"]
    assert main(["run", "--json", "-q", "--out", str(tmp_path / "plain"), *_run_args(tmp_path, base)]) == 0
    plain = json.loads(capsys.readouterr().out)["methods"]["dpfpl"]
    args = _run_args(tmp_path, [*base, "federation.secure_aggregation=true"])
    assert main(["run", "--json", "-q", "--out", str(tmp_path / "secure"), *args]) == 0
    secure = json.loads(capsys.readouterr().out)["methods"]["dpfpl"]
    assert 2.9 < secure["epsilon"] <= 3 + 1e-6 and secure["epsilon_kind"] == "accounted"
    assert secure["privacy"]["noise_multiplier"] > plain["privacy"]["noise_multiplier"]
