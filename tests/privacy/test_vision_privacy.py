"""Privacy of vision prompts: per-sample DP's per-record gradients through the prompted image layers
equal torch.func's, its ε is an independent accountant's for the mechanism that runs, and feature
mode is refused for them in one line."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings, Views
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.backbones.vision_tower import PromptedVision
from pfpl.config import load_config
from pfpl.data.clients import ClientData
from pfpl.data.features import Features
from pfpl.errors import ConfigError, PrivacyConfigError
from pfpl.federation.report import epsilons
from pfpl.federation.wiring import build_engine
from pfpl.privacy.mechanisms import FeatureDP, PerSampleDP, StepLoss, per_record_gradients
from pfpl.streams import Purpose, SeededDraws, Streams, client_streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEPTH, TOKENS, SCALE, DELTA = 2, 2, 20.0, 1e-5


def _world(backbone, classes, sizes):
    gen = torch.Generator().manual_seed(7)
    n = sum(sizes)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    tower = PromptTower(backbone, classes, n_ctx=2)
    tower.vision = PromptedVision(backbone.model.visual, TOKENS, depth=DEPTH)
    train = Features(backbone.encode_images(images), torch.arange(n) % len(classes), torch.zeros(n, dtype=torch.long))
    bounds = np.cumsum([0, *sizes])
    clients = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return tower, ClientData(train, clients, tokens=tower.vision.fixed(images))


def _rebuild(name: str, leaves: dict, views: Views, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ctx, vision) as plain functions of the leaves, written from each method's definition."""
    if name == "vpt":
        return views.ctx, leaves["vision"]
    if name == "ivlp":
        return leaves["global"], leaves["vision"]
    if name == "maple":
        g = leaves["global"]
        return g, torch.einsum("bpd,bjdw->bjpw", g[:, :TOKENS], leaves["coupling"]) + leaves["coupling_bias"][
            :, :, None
        ]
    a = views.aux  # dpfpl, both towers: global + u·v + (P − u₀·v₀)
    ctx = leaves["global"] + leaves["u"] @ leaves["v"] + params["local"] - a["u"] @ a["v"]
    flat = params["vlocal"].flatten(1, 2)
    low = leaves["vu"] @ leaves["vv"] + flat - a["vu"] @ a["vv"]
    return ctx, leaves["vglobal"] + low.view_as(params["vlocal"])


@pytest.mark.parametrize("name", ["vpt", "ivlp", "maple", "dpfpl"])
def test_per_record_gradients_through_the_prompted_image_layers_equal_torch_func(tiny_vit, classes, name):
    tower, data = _world(tiny_vit, classes, [5, 3])
    settings = MethodSettings(
        rank=2, init_std=0.3, modality="both", vision_shape=(DEPTH, TOKENS, tower.vision.width), template="a {}."
    )
    method = get_method(name)(settings)
    gen = torch.Generator().manual_seed(1)
    shared = method.init_shared(2, tiny_vit.ctx_dim, gen)
    rows = [method.init_local(2, tiny_vit.ctx_dim, gen) for _ in range(2)]
    params = {k: v[None].expand(2, *v.shape).clone() for k, v in shared.items()}
    params |= {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    clients = torch.arange(2)
    views = method.views(params, client_streams(0, Purpose.FACTORIZATION, clients, 0, 0))
    batch = data.batches(clients, 1, 4, "shuffle", Streams(0), 0)[0]  # client 1 has 3 records: one is padding
    text = method.text_features(tower, views)
    step = StepLoss(views.leaves, text, batch, SCALE, None, views.vision, tower.vision)
    ours = per_record_gradients(step)

    def loss(leaves_b, tokens, y, b):
        ctx, vision = _rebuild(name, leaves_b, _slice(views, b), {k: v[b : b + 1] for k, v in params.items()})
        text_b = method.text_features(tower, Views(leaves_b, ctx, vision=vision))
        x = tower.vision(tokens[None, None], vision)[0]
        return F.cross_entropy(SCALE * x @ text_b[0].t(), y[None])

    for b in range(2):
        leaves_b = {k: v[b : b + 1].detach() for k, v in views.leaves.items()}
        per_record = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, None))(
            leaves_b, batch.tokens[b], batch.y[b], b
        )
        for k in views.leaves:
            for n in range(batch.y.shape[1]):
                expected = per_record[k][n, 0] * batch.mask[b, n]
                assert torch.allclose(ours[k][n, b], expected, atol=1e-5, rtol=1e-4), (name, k, b, n)
    vision_leaves = [k for k in views.leaves if k in ("vision", "vu", "coupling")]
    assert all(ours[k].abs().max() > 1e-4 for k in vision_leaves)


def _slice(views: Views, b: int) -> Views:
    return Views({}, views.ctx[b : b + 1], {k: v[b : b + 1] for k, v in views.aux.items()})


def test_per_sample_dp_clips_each_record_jointly_over_vision_and_text_leaves(tiny_vit, classes):
    """σ = 0: the private leaves' update is Σ_n clip_C(g_n) over the joint per-record gradient."""
    tower, data = _world(tiny_vit, classes, [4])
    settings = MethodSettings(init_std=0.3, vision_shape=(DEPTH, TOKENS, tower.vision.width))
    method = get_method("ivlp")(settings)
    params = {k: v[None] for k, v in method.init_shared(2, tiny_vit.ctx_dim, torch.Generator().manual_seed(2)).items()}
    views = method.views(params, [torch.Generator()])
    batch = data.batches(torch.arange(1), 1, 4, "shuffle", Streams(0), 0)[0]

    def step():
        return StepLoss(
            views.leaves, method.text_features(tower, views), batch, SCALE, None, views.vision, tower.vision
        )

    clip = 0.05
    got, loss = PerSampleDP(clip, 0.0, ("global", "vision"))(
        step(), torch.tensor([4.0]), [SeededDraws(torch.Generator())]
    )
    g = per_record_gradients(step())
    norms = (g["global"].flatten(2).pow(2).sum(-1) + g["vision"].flatten(2).pow(2).sum(-1)).sqrt()  # [n, B]
    assert float(norms.min()) > clip  # every record is clipped: the clip matters
    factor = clip / norms
    for k in ("global", "vision"):
        expected = torch.einsum("nb,nb...->b...", factor, g[k]) / 4
        assert torch.allclose(got[k], expected, atol=1e-6)
    assert torch.isnan(loss).all()  # a private mechanism sends no loss


@pytest.mark.parametrize("name", ["vpt", "ivlp"])
def test_per_sample_epsilon_of_vision_prompts_is_the_independent_accountants(tiny_vit, classes, name):
    """Poisson rate 4/12, 2 rounds × 3 steps, σ = 1.5: ε is a sampled Gaussian composed 6 times."""
    tower, data = _world(tiny_vit, classes, [12, 12])
    cfg = load_config(
        None,
        [
            f"train.methods=['{name}']",
            "prompt.n_ctx=2",
            "train.rank=1",
            f"prompt.vision_tokens={TOKENS}",
            f"prompt.vision_depth={DEPTH}",
            "federation.n_clients=2",
            "federation.rounds=2",
            "federation.local_steps=3",
            "federation.batch_size=4",
            "dp.mode=per-sample",
            "dp.noise_multiplier=1.5",
            "dp.sampling=poisson",
            "dp.accountant=rdp",
        ],
    )
    sim, plan = build_engine(cfg, name, tower, data, SCALE)
    start = {k: v.clone() for k, v in sim.params.items()}
    for _ in range(2):
        sim.run_round()
    assert all(not torch.equal(sim.params[k], start[k]) for k in start)  # the vision prompts trained
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(4 / 12, dp_accounting.GaussianDpEvent(1.5)), 6
    )
    rdp = RdpAccountant()
    rdp.compose(event)
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    for eps in epsilons(sim, plan):
        assert eps == pytest.approx(rdp.get_epsilon(DELTA), rel=0.02)
        assert eps >= pld.get_epsilon(DELTA) * 0.99  # never below the tight bound


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.methods=['vpt']"],
        ["train.methods=['maple']"],
        ["train.methods=['dpfpl']", "prompt.modality=vision"],
        ["train.methods=['dplora']", "prompt.modality=both"],
    ],
)
def test_feature_mode_is_refused_for_vision_prompts_in_one_line(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*overrides, "dp.mode=feature", "dp.target_epsilon=1"])
    assert "dp.mode = 'feature' cannot cover" in str(err.value) and "\n" not in str(err.value)
    load_config(None, [*overrides, "dp.mode=per-sample", "dp.target_epsilon=1"])  # per-sample runs


def test_feature_mechanism_refuses_a_vision_step_and_modality_is_for_dpfpl_only(tiny_vit, classes):
    tower, data = _world(tiny_vit, classes, [4])
    method = get_method("vpt")(MethodSettings(vision_shape=(DEPTH, TOKENS, tower.vision.width)))
    params = {k: v[None] for k, v in method.init_shared(2, tiny_vit.ctx_dim, torch.Generator()).items()}
    views = method.views(params, [torch.Generator()])
    batch = data.batches(torch.arange(1), 1, 4, "shuffle", Streams(0), 0)[0]
    step = StepLoss(views.leaves, method.text_features(tower, views), batch, SCALE, None, views.vision, tower.vision)
    with pytest.raises(PrivacyConfigError, match="cannot cover vision prompts"):
        FeatureDP(1.0, 1.0)(step, torch.tensor([4.0]), [SeededDraws(torch.Generator())])
    with pytest.raises(ConfigError, match="applies to dpfpl and dplora"):
        load_config(None, ["train.methods=['coop', 'dpfpl']", "prompt.modality=vision"])
