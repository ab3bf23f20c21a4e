import math

import numpy as np
import pytest
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.config import load_config
from pfpl.data.clients import Batch, ClientData
from pfpl.errors import PrivacyConfigError
from pfpl.federation.client import TrainSettings
from pfpl.federation.report import epsilons
from pfpl.federation.simulator import Simulator
from pfpl.federation.wiring import build_engine
from pfpl.messages import Contributions, WeightedMean
from pfpl.privacy.aggregation import ClientLevelDP, GlobalDP
from pfpl.privacy.mechanisms import (
    BatchClipReference,
    BatchMean,
    FeatureDP,
    PerSampleDP,
    StepLoss,
    clipped_text_gradient,
)
from pfpl.privacy.rules import validate_dp
from pfpl.streams import Purpose, SeededDraws, Streams, client_streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def world(tiny, random_features, classes):
    train = random_features(tiny, 48)
    return tiny, train, [np.arange(0, 24), np.arange(24, 48)], classes


def _sim(world, name="coop", n_ctx=2, **kw):
    tiny, train, clients, classes = world
    tower = PromptTower(tiny, classes, n_ctx=n_ctx)
    s = TrainSettings(**{"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 1, **kw})
    return Simulator(
        get_method(name)(MethodSettings(rank=1, init_std=0.3)),
        tower,
        ClientData(train, clients),
        s,
        20.0,
        reference=tiny.encode_text([f"a photo of a {c}." for c in classes]),
    )


def _step(sim, batch=None) -> StepLoss:
    """One step's loss inputs with a fresh autograd graph (the same factorization every call)."""
    everyone = torch.arange(sim.n_clients)
    params = {**sim.server.broadcast(everyone), **sim.local}
    views = sim.method.views(params, client_streams(0, Purpose.FACTORIZATION, everyone))
    text = sim.tower(views.ctx[:, None])
    batch = batch or sim.data.batches(everyone, 1, 8, "shuffle", Streams(1), 0)[0]
    extra = sim.method.extra_loss(views, text, sim.tower, sim.update.reference)
    return StepLoss(views.leaves, text, batch, 20.0, extra)


def _noise(n):
    return Streams(0).rows(Purpose.SAMPLE_NOISE, range(n))


@pytest.mark.parametrize("mechanism", ["feature", "per-sample"])
@pytest.mark.parametrize("name", ["coop", "dpfpl", "fedpgp"])
def test_without_noise_or_clipping_dp_gradients_equal_the_plain_ones(world, mechanism, name):
    sim = _sim(world, name)
    norm = torch.full((2,), 8.0)
    plain, _ = BatchMean()(_step(sim), norm, _noise(2))
    private = tuple(x for x in sim.method.leaves if sim.method.is_private_leaf(x))
    mech = FeatureDP(1e9, 0.0) if mechanism == "feature" else PerSampleDP(1e9, 0.0, private)
    dp, _ = mech(_step(sim), norm, _noise(2))
    for k in plain:
        assert torch.allclose(plain[k], dp[k], atol=1e-5), (mechanism, name, k)


def _outlier_batch(sim, batch: Batch) -> tuple[Batch, Batch]:
    """The same batch plus one record whose loss is huge (its feature points at a wrong class)."""
    x2, y2, m2 = batch.x.clone(), batch.y.clone(), batch.mask.clone()
    x2[:, -1] = x2[:, 0] * 50.0
    with torch.no_grad():
        text = _step(sim).text
        y2[:, -1] = torch.einsum("be,bce->bc", x2[:, -1], text).argmin(-1)  # the least likely class
    m2[:, -1] = 1.0
    mask = batch.mask.clone()
    mask[:, -1] = 0.0
    return Batch(batch.x, batch.y, mask), Batch(x2, y2, m2)


@pytest.mark.parametrize(
    "mechanism, name",
    [
        ("feature", "coop"),
        ("feature", "dpfpl"),
        ("per-sample", "coop"),
        ("per-sample", "dpfpl"),
        ("per-sample", "fedotp-lite"),
    ],
)
def test_one_outlier_moves_the_pre_noise_sum_by_at_most_c(world, mechanism, name):
    sim = _sim(world, name)
    clip = 0.5
    without, with_outlier = _outlier_batch(sim, _step(sim).batch)
    if mechanism == "feature":  # the mechanism acts on the text-feature gradient: check there
        a = clipped_text_gradient(_step(sim, without), clip)
        b = clipped_text_gradient(_step(sim, with_outlier), clip)
        unclipped = clipped_text_gradient(_step(sim, with_outlier), 1e9) - clipped_text_gradient(
            _step(sim, without), 1e9
        )
        delta = (b - a).flatten(1).norm(dim=-1)
        assert (unclipped.flatten(1).norm(dim=-1) > 10 * clip).all(), "the outlier must matter without clipping"
    else:
        private = tuple(x for x in sim.method.leaves if sim.method.is_private_leaf(x))
        mech = PerSampleDP(clip, 0.0, private)
        a, _ = mech(_step(sim, without), torch.ones(2), _noise(2))
        b, _ = mech(_step(sim, with_outlier), torch.ones(2), _noise(2))
        delta = torch.sqrt(sum((b[n] - a[n]).flatten(1).pow(2).sum(-1) for n in private))
    assert (delta <= clip * (1 + 1e-5)).all(), delta


def test_feature_mode_noise_has_covariance_jt_sigma2c2_j(tiny, classes):
    """Leaf-gradient noise = Jᵀz with z ~ N(0, σ²C²I): compare variances along fixed directions."""
    tower = PromptTower(tiny, classes[:3], n_ctx=1)
    dim = tiny.model.text_projection.shape[1]
    sigma, clip = 2.0, 0.7
    mech = FeatureDP(clip, sigma)
    ctx = torch.randn(1, 1, tiny.ctx_dim, generator=torch.Generator().manual_seed(3)) * 0.3
    empty = Batch(torch.zeros(1, 4, dim), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))  # pure noise
    draws = []
    for k in range(1500):
        leaf = ctx.clone().requires_grad_(True)
        g, _ = mech(
            StepLoss({"local": leaf}, tower(leaf[:, None]), empty, 20.0),
            torch.ones(1),
            [SeededDraws(torch.Generator().manual_seed(k))],
        )
        draws.append(g["local"].flatten())
    draws = torch.stack(draws).double()
    jac = torch.autograd.functional.jacobian(lambda c: tower(c[:, None]).flatten(), ctx).reshape(-1, ctx.numel())
    cov = (sigma * clip) ** 2 * jac.T.double() @ jac.double()
    gen = torch.Generator().manual_seed(5)
    directions = [torch.linalg.eigh(cov).eigenvectors[:, -1]] + [
        torch.randn(ctx.numel(), generator=gen).double() for _ in range(4)
    ]
    for a in directions:
        expected = float(a @ cov @ a)
        observed = float((draws @ a).var())
        assert abs(observed / expected - 1) < 0.15, (observed, expected)
    wrong = (sigma * clip) ** 2 * torch.eye(ctx.numel(), dtype=torch.float64)
    a = directions[0]
    assert abs(float((draws @ a).var()) / float(a @ wrong @ a) - 1) > 0.5


def test_reference_mode_reproduces_batch_clipping(world):
    sim = _sim(world, "dpfpl")
    plain, _ = BatchMean()(_step(sim), torch.ones(2), _noise(2))
    clip = 1e-3
    ref, _ = BatchClipReference(clip, 0.0, ("u", "v"))(_step(sim), torch.ones(2), _noise(2))
    for k, g in plain.items():
        norms = g.flatten(1).norm(dim=-1)
        assert (norms > clip).all()
        expected = g * (clip / norms).view(-1, *[1] * (g.dim() - 1))
        assert torch.allclose(ref[k], expected, atol=1e-9), k
        assert torch.allclose(ref[k].flatten(1).norm(dim=-1), torch.full((2,), clip), rtol=1e-4)


def test_per_sample_gradients_match_a_loop_over_samples(world):
    sim = _sim(world, "fedotp-lite")
    clip = 0.05
    step = _step(sim)
    dp, _ = PerSampleDP(clip, 0.0, ("local",))(step, torch.ones(2), _noise(2))
    x, y, mask = step.batch.x, step.batch.y, step.batch.mask
    expected = torch.zeros_like(sim.local["local"])
    for b in range(2):
        for n in range(x.shape[1]):
            m = torch.zeros_like(mask)
            m[b, n] = 1.0
            g, _ = BatchMean()(_step(sim, Batch(x, y, m)), torch.ones(2), _noise(2))
            expected[b] += g["local"][b] * min(1.0, clip / float(g["local"][b].norm()))
    assert torch.allclose(dp["local"], expected, atol=1e-6)


def test_calibrated_runs_meet_the_target_epsilon(world):
    tiny, train, clients, classes = world
    tower = PromptTower(tiny, classes, n_ctx=2)
    settings = TrainSettings(rounds=3, local_steps=2, batch_size=8, seed=1, sampling="poisson")

    def engine(*overrides):
        cfg = load_config(None, [*overrides, "federation.rounds=3", "train.rank=1", "prompt.n_ctx=2"])
        return build_engine(cfg, "dpfpl", tower, ClientData(train, clients), 20.0, settings=settings)

    sim, plan = engine("dp.mode=per-sample", "dp.target_epsilon=2.0")
    assert plan.has_local and plan.has_shared_global and plan.sigma > 0
    for _ in range(3):
        sim.run_round()
    eps = epsilons(sim, plan)
    assert max(eps) <= 2.0 + 1e-6 and max(eps) > 1.9
    assert isinstance(sim.update.mechanism, PerSampleDP) and isinstance(sim.server.aggregator, GlobalDP)
    _, feature = engine("dp.mode=feature", "dp.target_epsilon=2.0")
    assert feature.sigma < plan.sigma  # one mechanism needs less noise than two composed
    with pytest.raises(PrivacyConfigError, match="cannot be met by dpfpl") as err:  # a target nothing meets
        engine("dp.mode=per-sample", "dp.target_epsilon=2.0", "dp.global_dp=false")
    assert "\n" not in str(err.value)
    off_sim, off = engine("dp.mode=per-sample", "dp.noise_multiplier=1.0", "dp.global_dp=false")
    off_sim.run_round()  # σ given directly: it runs, and says ε = ∞ (the global prompt is un-noised)
    assert math.isinf(max(epsilons(off_sim, off))) and off.epsilon_kind == "none" and not off.formal()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["dp.mode=reference", "dp.target_epsilon=1", "train.methods=['coop']"], ["reference", "coop"]),
        (["dp.mode=reference", "train.methods=['dpfpl']"], ["nominal"]),
        (["dp.target_epsilon=1"], ["dp.mode='off'"]),
        (["dp.mode=feature", "dp.target_epsilon=1", "dp.noise_multiplier=2"], ["not both"]),
    ],
)
def test_bad_combinations_fail_before_training(overrides, words):
    cfg = load_config(None, overrides)
    with pytest.raises(PrivacyConfigError) as err:
        validate_dp(cfg.dp, cfg.train.methods)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["dp.target_epsilon=-1", "dp.delta=1", "dp.clip=0", "dp.mode=laplace"])
def test_invalid_dp_values_are_config_errors(bad):
    from pfpl.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])


def _contributions(values, sizes, groups=None, n_groups=1):
    groups = torch.zeros(len(values), dtype=torch.long) if groups is None else groups
    return Contributions(values, sizes, torch.arange(len(values)), groups, n_groups)


def test_client_level_dp_clips_each_client_and_weighs_them_equally():
    update = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    c = _contributions(update, torch.tensor([1.0, 9.0]))
    mean = ClientLevelDP(WeightedMean(), clip=1.0)(c, SeededDraws(torch.Generator()))
    assert torch.allclose(mean, torch.tensor([[0.5, 0.25, 0.0]]))  # clipped to S, uniform mean
    noisy = ClientLevelDP(WeightedMean(), clip=1.0, noise_multiplier=2.0)(
        c, SeededDraws(torch.Generator().manual_seed(0))
    )
    assert not torch.allclose(noisy, mean)


def test_global_dp_noise_follows_the_largest_per_record_weight_in_each_group():
    """std = σ·C·max_i a_i/B_i per group; wrapped around client-level DP, a_i are its equal weights."""
    values = torch.zeros(4, 20000)
    sizes = torch.tensor([10.0, 30.0, 100.0, 100.0])
    c = _contributions(values, sizes, torch.tensor([0, 0, 1, 1]), 2)
    out = GlobalDP(WeightedMean(), noise_multiplier=2.0, clip=3.0, batch_size=32)(
        c, SeededDraws(torch.Generator().manual_seed(1))
    )
    expected = [2.0 * 3.0 * max(10 / 40 / 10, 30 / 40 / 30), 2.0 * 3.0 * 0.5 / 32]
    assert torch.allclose(out.std(dim=1), torch.tensor(expected), rtol=0.03)
    both = GlobalDP(ClientLevelDP(WeightedMean(), clip=1.0), noise_multiplier=2.0, clip=3.0, batch_size=32)
    out = both(c, SeededDraws(torch.Generator().manual_seed(2)))
    expected = [2.0 * 3.0 * 0.5 / 10, 2.0 * 3.0 * 0.5 / 32]
    assert torch.allclose(out.std(dim=1), torch.tensor(expected), rtol=0.03)


def test_dp_aggregators_compose_around_the_server_and_keep_both_noises(world):
    """Client-level DP no longer switches global DP off: the run's aggregator carries both."""
    tiny, train, clients, classes = world
    cfg = load_config(
        None, ["dp.mode=per-sample", "dp.noise_multiplier=1.0", "dp.client_clip=1.0", "dp.client_noise_multiplier=0.5"]
    )
    sim, _ = build_engine(
        cfg,
        "dpfpl",
        PromptTower(tiny, classes, n_ctx=2),
        ClientData(train, clients),
        20.0,
        settings=TrainSettings(rounds=1, local_steps=1, batch_size=8),
    )
    agg = sim.server.aggregator
    assert (
        isinstance(agg, GlobalDP) and isinstance(agg.inner, ClientLevelDP) and isinstance(agg.inner.inner, WeightedMean)
    )


def test_a_clients_noise_comes_from_its_own_stream(world):
    """A client's noise comes from its own stream: the same draw alone and in a batch."""
    sim = _sim(world, "coop")
    mech = FeatureDP(1.0, 3.0)
    both, _ = mech(_step(sim), torch.ones(2), _noise(2))
    alone_step = _step(sim)
    one = {k: v[1:2] for k, v in alone_step.leaves.items()}
    leaf = one["local"].detach().clone().requires_grad_(True)
    text = sim.tower(leaf[:, None])
    alone, _ = mech(
        StepLoss({"local": leaf}, text, alone_step.batch.rows(1, 2), 20.0),
        torch.ones(1),
        Streams(0).rows(Purpose.SAMPLE_NOISE, [1]),
    )
    assert torch.allclose(both["local"][1], alone["local"][0], atol=1e-5)
