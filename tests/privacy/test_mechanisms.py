import math

import numpy as np
import pytest
import torch

from pfpl.algorithms import methods as M
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.config import load_config
from pfpl.data.features import Features
from pfpl.federation.simulator import EngineSettings, Simulator, batch_gradients
from pfpl.privacy.accounting import PrivacyConfigError
from pfpl.privacy.mechanisms import DPSettings, Privatizer, build_privacy, validate_dp

from conftest import CLASSES, random_train_features


@pytest.fixture
def world(tiny):
    train = random_train_features(tiny, 48)
    return tiny, train, [np.arange(0, 24), np.arange(24, 48)]


def _sim(world, name="coop", n_ctx=2, **kw):
    tiny, train, clients = world
    tower = PromptTower(tiny, CLASSES, n_ctx=n_ctx)
    s = EngineSettings(**{"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 1, **kw})
    sim = Simulator(M.METHODS[name](MethodSettings(rank=1, init_std=0.3)), tower, train, clients, s, 20.0,
                    reference=tiny.encode_text([f"a photo of a {c}." for c in CLASSES]))
    return sim


def _step_inputs(sim):
    active = torch.arange(sim.n_clients)
    x, y, mask = sim.batches(0, active)[0]
    views, text = _fresh(sim)
    return views, text, x, y, mask, active


def _fresh(sim):
    """Views and text features with a new autograd graph (same factorization every call)."""
    views = sim.method.views(sim._slice(torch.arange(sim.n_clients), None), torch.Generator().manual_seed(0))
    return views, sim.tower(views.ctx[:, None])


def _privatizer(sim, mode, expected=None, **kw):
    exp = expected if expected is not None else sim.expected_batch()
    return Privatizer(DPSettings(mode=mode, **kw), exp, sim.method.private_leaves, sim.method.global_params)


@pytest.mark.parametrize("mode", ["feature", "per-sample"])
@pytest.mark.parametrize("name", ["coop", "dpfpl", "fedpgp"])
def test_without_noise_or_clipping_dp_gradients_equal_the_plain_ones(world, mode, name):
    sim = _sim(world, name)
    views, text, x, y, mask, active = _step_inputs(sim)
    plain, _ = batch_gradients(sim, views, text, x, y, mask)
    views, text = _fresh(sim)
    dp, _ = _privatizer(sim, mode, clip=1e9).gradients(sim, views, text, x, y, mask, active, torch.Generator())
    for k in plain:
        assert torch.allclose(plain[k], dp[k], atol=1e-5), (mode, name, k)


def _outlier_batch(sim, x, y, mask):
    """The same batch plus one record whose loss is huge (its feature points at a wrong class)."""
    x2, y2, m2 = x.clone(), y.clone(), mask.clone()
    x2[:, -1] = x2[:, 0] * 50.0
    with torch.no_grad():
        _, text = _fresh(sim)
        y2[:, -1] = torch.einsum("be,bce->bc", x2[:, -1], text).argmin(-1)  # the least likely class
    m2[:, -1] = 1.0
    mask = mask.clone()
    mask[:, -1] = 0.0
    return (x, y, mask), (x2, y2, m2)


@pytest.mark.parametrize("mode, name", [("feature", "coop"), ("feature", "dpfpl"), ("per-sample", "coop"),
                                        ("per-sample", "dpfpl"), ("per-sample", "fedotp")])
def test_one_outlier_moves_the_pre_noise_sum_by_at_most_c(world, mode, name):
    sim = _sim(world, name)
    views, text, x, y, mask, active = _step_inputs(sim)
    clip = 0.5
    without, with_outlier = _outlier_batch(sim, x, y, mask)
    priv = _privatizer(sim, mode, expected=torch.ones(sim.n_clients), clip=clip)
    if mode == "feature":  # the mechanism acts on the text-feature gradient: check there
        from pfpl.privacy.mechanisms import clipped_text_gradient

        a = clipped_text_gradient(sim.scale, *without[:1], text, *without[1:], clip)
        b = clipped_text_gradient(sim.scale, *with_outlier[:1], text, *with_outlier[1:], clip)
        unclipped = clipped_text_gradient(sim.scale, *with_outlier[:1], text, *with_outlier[1:], 1e9) - \
            clipped_text_gradient(sim.scale, *without[:1], text, *without[1:], 1e9)
        delta = (b - a).flatten(1).norm(dim=-1)
        assert (unclipped.flatten(1).norm(dim=-1) > 10 * clip).all(), "the outlier must matter without clipping"
    else:
        a, _ = priv.gradients(sim, views, text, *without, active, torch.Generator())
        views, text = _fresh(sim)
        b, _ = priv.gradients(sim, views, text, *with_outlier, active, torch.Generator())
        private = [n for n in a if n in sim.method.private_leaves]
        delta = torch.sqrt(sum((b[n] - a[n]).flatten(1).pow(2).sum(-1) for n in private))
    assert (delta <= clip * (1 + 1e-5)).all(), delta


def test_feature_mode_noise_has_covariance_jt_sigma2c2_j(tiny):
    """Leaf-gradient noise = Jᵀz with z ~ N(0, σ²C²I): compare variances along fixed directions."""
    tower = PromptTower(tiny, CLASSES[:3], n_ctx=1)
    train = Features(torch.zeros(4, tiny.model.text_projection.shape[1]), torch.zeros(4, dtype=torch.long),
                     torch.zeros(4, dtype=torch.long))
    sim = Simulator(M.CoOp(MethodSettings(init_std=0.3)), tower, train, [np.arange(4)],
                    EngineSettings(batch_size=4, seed=0), 20.0)
    sigma, clip = 2.0, 0.7
    priv = _privatizer(sim, "feature", expected=torch.ones(1), clip=clip, noise_multiplier=sigma)
    active = torch.arange(1)
    x = torch.zeros(1, 4, train.features.shape[1])
    y = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.zeros(1, 4)  # no data: the gradient is pure noise
    views = sim.method.views(sim._slice(active, None), torch.Generator())
    draws = []
    for k in range(1500):
        text = sim.tower(views.ctx[:, None])
        g, _ = priv.gradients(sim, views, text, x, y, mask, active, torch.Generator().manual_seed(k))
        draws.append(g["local"].flatten())
    draws = torch.stack(draws).double()
    ctx = views.ctx.detach()
    jac = torch.autograd.functional.jacobian(lambda c: sim.tower(c[:, None]).flatten(), ctx).reshape(-1, ctx.numel())
    cov = (sigma * clip) ** 2 * jac.T.double() @ jac.double()
    gen = torch.Generator().manual_seed(5)
    directions = [torch.linalg.eigh(cov).eigenvectors[:, -1]] + [torch.randn(ctx.numel(), generator=gen).double() for _ in range(4)]
    for a in directions:
        expected = float(a @ cov @ a)
        observed = float((draws @ a).var())
        assert abs(observed / expected - 1) < 0.15, (observed, expected)
    wrong = (sigma * clip) ** 2 * torch.eye(ctx.numel(), dtype=torch.float64)
    a = directions[0]
    assert abs(float((draws @ a).var()) / float(a @ wrong @ a) - 1) > 0.5


def test_reference_mode_reproduces_batch_clipping(world):
    sim = _sim(world, "dpfpl")
    views, text, x, y, mask, active = _step_inputs(sim)
    plain, _ = batch_gradients(sim, views, text, x, y, mask)
    views, text = _fresh(sim)
    clip = 1e-3
    ref, _ = _privatizer(sim, "reference", clip=clip).gradients(sim, views, text, x, y, mask, active, torch.Generator())
    for k, g in plain.items():
        norms = g.flatten(1).norm(dim=-1)
        assert (norms > clip).all()
        expected = g * (clip / norms).view(-1, *[1] * (g.dim() - 1))
        assert torch.allclose(ref[k], expected, atol=1e-9), k
        assert torch.allclose(ref[k].flatten(1).norm(dim=-1), torch.full((2,), clip), rtol=1e-4)


def test_per_sample_gradients_match_a_loop_over_samples(world):
    sim = _sim(world, "fedotp")
    views, text, x, y, mask, active = _step_inputs(sim)
    clip = 0.05
    dp, _ = _privatizer(sim, "per-sample", expected=torch.ones(2), clip=clip).gradients(
        sim, views, text, x, y, mask, active, torch.Generator())
    expected = torch.zeros_like(sim.params["local"])
    for b in range(2):
        for n in range(x.shape[1]):
            m = torch.zeros_like(mask)
            m[b, n] = 1.0
            v = sim.method.views(sim._slice(active, None), torch.Generator().manual_seed(0))
            g, _ = batch_gradients(sim, v, sim.tower(v.ctx[:, None]), x, y, m)
            expected[b] += g["local"][b] * min(1.0, clip / float(g["local"][b].norm()))
    assert torch.allclose(dp["local"], expected, atol=1e-6)


def test_calibrated_runs_meet_the_target_epsilon(world):
    sim = _sim(world, "dpfpl")
    dp = load_config(None, ["dp.mode=per-sample", "dp.target_epsilon=2.0"]).dp
    plan = build_privacy(sim, dp, rounds=3, method_name="dpfpl")
    assert plan.has_local and plan.has_shared_global and plan.sigma > 0
    eps = plan.epsilons(torch.tensor([3, 3]))
    assert max(eps) <= 2.0 + 1e-6 and max(eps) > 1.9
    assert sim.gradients.__self__ is not None  # the hooks are attached
    feature = build_privacy(_sim(world, "dpfpl"), load_config(None, ["dp.mode=feature", "dp.target_epsilon=2.0"]).dp,
                            rounds=3, method_name="dpfpl")
    assert feature.sigma < plan.sigma  # one mechanism needs less noise than two composed
    off = load_config(None, ["dp.mode=per-sample", "dp.target_epsilon=2.0", "dp.global_dp=false"]).dp
    assert math.isinf(max(build_privacy(_sim(world, "dpfpl"), off, 3, "dpfpl").epsilons(torch.tensor([3, 3]))))


@pytest.mark.parametrize("overrides, words", [
    (["dp.mode=reference", "dp.target_epsilon=1", "train.methods=['coop']"], ["reference", "coop"]),
    (["dp.mode=reference", "train.methods=['dpfpl']"], ["nominal"]),
    (["dp.target_epsilon=1"], ["dp.mode='off'"]),
    (["dp.mode=feature", "dp.target_epsilon=1", "dp.noise_multiplier=2"], ["not both"]),
])
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


@pytest.mark.parametrize("sync, steps_per_round", [("step", 2), ("fedavg", 1)])
def test_client_level_dp_charges_every_aggregation(world, sync, steps_per_round):
    from pfpl.privacy.accounting import Mechanism, epsilon

    sim = _sim(world, "fedotp", sync=sync)
    dp = load_config(None, ["dp.client_clip=1.0", "dp.client_noise_multiplier=2.0"]).dp
    plan = build_privacy(sim, dp, rounds=3, method_name="fedotp")
    expected = epsilon(Mechanism(2.0, 1.0, 3 * steps_per_round), 1e-5)
    assert plan.client_level_epsilon(3) == pytest.approx(expected)
    clip_only = _sim(world, "fedotp", sync=sync)
    build_privacy(clip_only, load_config(None, ["dp.client_clip=1.0"]).dp, rounds=3, method_name="fedotp")
    update = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    mean = clip_only.aggregate(update, torch.tensor([1.0, 9.0]), torch.arange(2), torch.Generator())
    assert torch.allclose(mean, torch.tensor([0.5, 0.25, 0.0]))  # clipped to S, uniform mean
    noisy = sim.aggregate(update, torch.tensor([1.0, 9.0]), torch.arange(2), torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, mean)
