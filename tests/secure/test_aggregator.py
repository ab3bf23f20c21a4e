"""The engine's secure aggregator: equal to the plaintext aggregation within the fixed-point bound,
distributed noise of the planned size, runs that survive dropouts and skip, count and survive the
exchanges that fall below the threshold."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pfpl.messages import Contributions, WeightedMean
from pfpl.privacy.aggregation import ClientLevelDP
from pfpl.secure.aggregator import SecureAggregator, SecureSettings
from pfpl.streams import SeededDraws, Streams


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
    secure = SecureAggregator(settings)(c, SeededDraws(torch.Generator()))
    plain = WeightedMean()(c, SeededDraws(torch.Generator()))
    bound = 2.0 ** -(settings.frac_bits + 1)  # |error| ≤ B / (2·2^f·Σn) ≤ 2^-(f+1)
    assert float((secure - plain).abs().max()) <= bound
    assert float((secure - plain).abs().max()) > 0  # it really went through the fixed-point ring


def test_clients_dropping_before_their_input_are_left_out_exactly_like_plaintext():
    drops = {20: ("share", 0), 21: ("masked", 0), 3: ("unmask", 0)}  # 20, 21 never delivered; 3 did
    c = _contributions(n=8, drops=drops)
    secure = SecureAggregator(SecureSettings(frac_bits=22, threshold=0.6, graph="full"))(
        c, SeededDraws(torch.Generator())
    )
    assert torch.allclose(secure, WeightedMean()(c, SeededDraws(torch.Generator())), atol=2.0**-23)


def test_client_level_clipping_moves_to_the_clients():
    c = _contributions(n=6)
    c.expected = torch.tensor([6.0])
    secure = SecureAggregator(SecureSettings(frac_bits=22, graph="full"), weighting="equal", client_clip=1.0)
    plain = ClientLevelDP(WeightedMean(), clip=1.0)
    assert torch.allclose(
        secure(c, SeededDraws(torch.Generator())), plain(c, SeededDraws(torch.Generator())), atol=2.0**-22
    )


@pytest.mark.parametrize("colluders", [None, 2, 5])
def test_distributed_noise_is_sized_for_the_honest_survivors(colluders):
    """Zero contributions: the decoded mean is pure Skellam noise. At least t clients survive, of whom
    at most ``colluders`` (default t − 1) collude with the server and can subtract their own shares;
    each of the n clients adds 1/(t − colluders) of the planned variance, so the honest survivors alone
    carry all of it and the sum of n shares has n/(t − colluders) of it."""
    n, dim = 10, 20000
    c = Contributions(torch.zeros(n, dim), torch.full((n,), 20.0), torch.arange(n), torch.zeros(n, dtype=torch.long), 1)
    settings = SecureSettings(graph="full", threshold=0.6, noise_bits=12, colluders=colluders)
    agg = SecureAggregator(settings, noise_std=3.0, clients=Streams(0))
    out = agg(c, SeededDraws(torch.Generator()))
    t = settings.threshold_for(n)
    honest = t - (t - 1 if colluders is None else min(colluders, t - 1))
    assert honest == settings.honest_for(t) and honest >= 1
    expected = 3.0 * np.sqrt(n / honest) / (20.0 * n)  # std of the sum's noise, over Σ n_i
    assert float(out.std()) == pytest.approx(expected, rel=0.03)
    # what the guaranteed honest survivors carry alone is the planned variance, never less
    assert agg.noise_share(t) * honest == pytest.approx(agg.lam_total())


def test_a_failed_instance_releases_nothing_for_its_group_and_the_others_go_on():
    """Group 1's instance cannot unmask (every holder is needed, one drops while unmasking): its
    aggregate is not released and the failure is recorded; group 0's is exact."""
    c = _contributions(n=6, groups=torch.tensor([0, 0, 0, 0, 1, 1]), n_groups=2, drops={4: ("unmask", 1)})
    agg = SecureAggregator(SecureSettings(frac_bits=22, threshold=1.0, graph="full"))
    out = agg(c, SeededDraws(torch.Generator()))
    assert agg.releases(c).tolist() == [True, False]
    assert [(f["group"], f["round"], f["step"]) for f in agg.failures] == [(1, 2, 1)]
    plain = WeightedMean()(c, SeededDraws(torch.Generator()))
    assert torch.allclose(out[0], plain[0], atol=2.0**-21)
    later = replace(_contributions(n=6, groups=torch.tensor([0, 0, 0, 0, 1, 1]), n_groups=2), step=2)
    agg(later, SeededDraws(torch.Generator()))
    assert agg.releases(later).tolist() == [True, True] and len(agg.failures) == 1  # the next exchange is fresh
    assert agg.releases(c).tolist() == [True, False]  # what failed stays failed


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


def test_an_exchange_with_too_few_survivors_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    """Threshold 1 (every client needed) at 50% dropout: most exchanges cannot complete. Each is skipped
    (the shared prompt does not move, clients keep their local steps), counted per round in
    metrics.jsonl and in the summary, and the run finishes all its rounds."""
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
    assert main(["run", "-q", "--json", "--out", str(tmp_path / "run"), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("secure_failures" in r for r in rows)
    assert summary["methods"]["dpfpl"]["secure_failures"] == sum(r["secure_failures"] for r in rows) > 0


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
