"""The vision and multimodal prompt methods in the engine: vectorized steps equal each client alone,
one-client calls equal the vectorized round, gradients reach the vision prompts, and DP-FPL's split
applies to the vision prompts as to the text ones."""

import numpy as np
import pytest
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.backbones.vision_tower import PromptedVision
from pfpl.data.clients import ClientData
from pfpl.data.features import Features
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator
from pfpl.streams import Streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: (method, prompt.modality)
CASES = [
    ("vpt", "text"),
    ("ivlp", "text"),
    ("maple", "text"),
    ("dpfpl", "vision"),
    ("dpfpl", "both"),
    ("dplora", "both"),
]
DEPTH, TOKENS = 2, 2


@pytest.fixture
def vision_world(tiny_vit, classes):
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(36, 3, 32, 32, generator=gen)
    labels = torch.arange(36) % len(classes)
    tower = PromptTower(tiny_vit, classes, n_ctx=4)
    tower.vision = PromptedVision(tiny_vit.model.visual, TOKENS, depth=DEPTH)
    train = Features(tiny_vit.encode_images(images), labels, torch.zeros(36, dtype=torch.long))
    data = ClientData(
        train, [np.arange(0, 12), np.arange(12, 28), np.arange(28, 36)], tokens=tower.vision.fixed(images)
    )
    return tower, data


def _settings(tower, modality):
    return MethodSettings(
        rank=2, init_std=0.1, modality=modality, vision_shape=(DEPTH, TOKENS, tower.vision.width), template="a {}."
    )


def _sim(world, name, modality, one_client_calls=False, **kw):
    tower, data = world
    settings = TrainSettings(**{"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 3, **kw})
    method = get_method(name)(_settings(tower, modality))
    return Simulator(method, tower, data, settings, scale=20.0, one_client_calls=one_client_calls)


def _params(sim, active):
    return {**sim.server.broadcast(active), **{k: v[active] for k, v in sim.local.items()}}


@pytest.mark.parametrize(("name", "modality"), CASES)
def test_vectorized_step_equals_each_client_alone_and_reaches_the_vision_prompts(vision_world, name, modality):
    sim = _sim(vision_world, name, modality)
    assert sim.method.prompts_vision
    active = torch.arange(sim.n_clients)
    batch = sim.data.batches(active, 1, 8, "shuffle", Streams(3), 0)[0]
    assert batch.tokens is not None and batch.tokens.shape[:2] == batch.y.shape
    norm = sim.sizes.clamp(max=8)
    together, loss = sim.update.gradients(_params(sim, active), active, batch, norm, 0, 0, sim.streams)
    vision_params = [k for k in together if k in ("vision", "vglobal", "vlocal", "coupling", "coupling_bias")]
    assert vision_params and all(together[k].abs().max() > 0 for k in vision_params)
    for c in range(sim.n_clients):
        one = torch.tensor([c])
        alone, l1 = sim.update.gradients(
            _params(sim, one), one, batch.rows(c, c + 1), norm[c : c + 1], 0, 0, sim.streams
        )
        assert torch.allclose(l1, loss[c : c + 1], atol=1e-6)
        for key in together:
            assert torch.allclose(together[key][c], alone[key][0], atol=1e-5), (name, key, c)


@pytest.mark.parametrize(("name", "modality"), [("vpt", "text"), ("maple", "text"), ("dpfpl", "both")])
def test_one_client_calls_and_a_small_image_budget_equal_the_vectorized_round(vision_world, name, modality):
    together = _sim(vision_world, name, modality)
    alone = _sim(vision_world, name, modality, one_client_calls=True)
    tower = vision_world[0]
    tower.vision.max_images = 8  # one client (batch 8) per call: the budget bounds the call, not the result
    small = _sim(vision_world, name, modality)
    tower.vision.max_images = 4096
    assert small.host.clients_per_call == 1 and together.host.clients_per_call >= 3
    start = {k: v.clone() for k, v in together.params.items()}
    for sim in (together, alone, small):
        sim.run_round()
    for k in together.params:
        assert not torch.equal(together.params[k], start[k]), k  # every parameter trained
        for other in (alone, small):
            assert torch.allclose(together.params[k], other.params[k], rtol=1e-5, atol=1e-5), k


def test_dpfpl_on_the_vision_tower_is_global_plus_low_rank_local_and_text_stays_the_template(vision_world):
    tower, _ = vision_world
    method = get_method("dpfpl")(_settings(tower, "vision"))
    assert method.shared_params == ("vglobal",) and method.local_params == ("vlocal",)
    assert set(method.leaves) == {"vglobal", "vu", "vv"} and method.is_private_leaf("vu")
    gen = torch.Generator().manual_seed(0)
    shared, local = method.init_shared(4, tower.backbone.ctx_dim, gen), method.init_local(4, 64, gen)
    params = {k: v[None] for k, v in {**shared, **local}.items()}
    views = method.views(params, [torch.Generator().manual_seed(1)])
    assert torch.allclose(views.vision[0], shared["vglobal"] + local["vlocal"], atol=1e-5)  # u·v + r is the local
    # the classifier is the frozen template's class text features
    template = tower.backbone.encode_text([f"a {c}." for c in tower.classnames])
    assert torch.allclose(method.text_features(tower, views)[0], template)
    both = get_method("dpfpl")(_settings(tower, "both"))
    assert both.shared_params == ("global", "vglobal") and both.local_params == ("local", "vlocal")


def test_maple_vision_prompts_are_projected_from_the_text_context(vision_world):
    tower, _ = vision_world
    method = get_method("maple")(_settings(tower, "text"))
    gen = torch.Generator().manual_seed(0)
    shared = {k: v[None] for k, v in method.init_shared(4, tower.backbone.ctx_dim, gen).items()}
    views = method.views(shared, [gen])
    g, w, b = shared["global"][0], shared["coupling"][0], shared["coupling_bias"][0]
    for j in range(DEPTH):
        assert torch.allclose(views.vision[0, j], g[:TOKENS] @ w[j] + b[j], atol=1e-6)
    (grad,) = torch.autograd.grad(views.vision.sum(), views.leaves["global"])
    assert grad[0, :TOKENS].abs().max() > 0 and grad[0, TOKENS:].abs().max() == 0
