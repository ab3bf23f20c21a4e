"""FedOTP: global and local prompts aligned to an image's patch features by unbalanced optimal transport;
FedOTP-lite (global + local, summed) stays as the DP-FPL baseline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from pfpl.algorithms import DEFAULT_METHODS, get_method, spec
from pfpl.algorithms.base import MethodSettings
from pfpl.algorithms.fedotp import transport_plan
from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.backbones.patches import PatchEncoder, patch_features
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("mass", [0.8, 0.5])
def test_the_transport_plan_satisfies_its_marginal_constraints(mass):
    """Each prompt (column) receives exactly mass/K; no patch (row) gives more than 1/P, to the tolerance
    the Sinkhorn iterations reach; the plan moves mass ρ in all, so some patches give less than 1/P."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.nn.functional.normalize(torch.randn(3, 5, 7, 16, generator=gen), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(3, 5, 2, 16, generator=gen), dim=-1)
    s = torch.einsum("abpe,abke->abpk", sim, prompts)  # [.., P=7, K=2] similarities in [-1, 1]
    tolerance = 1e-4
    plan = transport_plan(s.double(), mass=mass, eps=0.05, iterations=1000, tolerance=tolerance)
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(-2), torch.full((3, 5, 2), mass / 2, dtype=plan.dtype), rtol=1e-9)
    rows = plan.sum(-1)
    assert (rows <= (1 / 7) * (1 + 10 * tolerance)).all()
    assert torch.allclose(plan.sum((-2, -1)), torch.full((3, 5), mass, dtype=plan.dtype))
    assert (rows < (1 / 7) * 0.99).any()  # partial: the constraint on patches is an inequality
    # mass follows similarity: a patch's share of a prompt grows with its similarity to it
    flat_s, flat_p = s[0, 0, :, 0], plan[0, 0, :, 0]
    assert flat_p[flat_s.argmax()] >= flat_p[flat_s.argmin()]


def test_full_mass_is_balanced_transport():
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(4, 6, 2, generator=gen, dtype=torch.float64) * 2 - 1
    plan = transport_plan(s, mass=1.0, eps=0.1, iterations=5000, tolerance=1e-10)
    assert torch.allclose(plan.sum(-1), torch.full((4, 6), 1 / 6, dtype=plan.dtype), atol=1e-6)
    assert torch.allclose(plan.sum(-2), torch.full((4, 2), 0.5, dtype=plan.dtype), atol=1e-9)


def test_both_image_towers_give_normalised_patch_features(tiny):
    images = torch.randn(2, 3, 32, 32)
    resnet = patch_features(tiny.model, images)  # the tiny ModifiedResNet: 32 px / 32 → 1 position
    assert resnet.shape == (2, 1, 32) and torch.allclose(resnet.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    from pfpl.backbones.embedded import build_model

    vit = OpenClipBackbone(
        build_model(cfg), "tiny-vit", open_clip.image_transform(32, is_train=False), SimpleTokenizer()
    )
    patches = patch_features(vit.model, images)
    assert patches.shape == (2, 16, 32) and torch.allclose(patches.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    assert not vit.model.visual.output_tokens  # left as it was
    encoder = PatchEncoder(vit)
    assert encoder.fingerprint != vit.fingerprint  # its own cache key
    assert encoder.encode_images(images).shape == (2, 16 * 32)


def test_fedotp_trains_and_scores_images_by_their_patches(tiny, random_features, classes):
    train = random_features(tiny, 48)
    gen = torch.Generator().manual_seed(2)
    patches = torch.nn.functional.normalize(torch.randn(48, 4, 32, generator=gen), dim=-1)
    train = replace(train, tokens=patches)
    clients = [np.flatnonzero(np.isin(train.labels.numpy(), pair)) for pair in ([0, 1], [2, 3], [4, 5])]
    method = get_method("fedotp")(MethodSettings(init_std=0.1))
    settings = TrainSettings(rounds=2, local_steps=2, batch_size=8, lr=0.5, sync="fedavg", seed=2)
    data = ClientData(train, clients, tokens=patches)
    sim = Simulator(method, PromptTower(tiny, classes, n_ctx=2), data, settings, 20.0)
    sim.run_round()
    classifier = sim.text_features()
    scores = classifier[0].scores(train, torch.arange(48))
    assert scores.shape == (48, 6) and torch.isfinite(scores).all()
    # the score is s · Σ plan ⊙ similarity, the plan from the client's two prompts
    params = sim.params
    text = method.text_features(sim.tower, method.views({k: v[:1] for k, v in params.items()}, [None]))
    plan = method.plan(patches[None, :3], text)
    sim3 = torch.einsum("bnpe,bkce->bncpk", patches[None, :3], text)
    assert torch.allclose(scores[:3], method.scale * (plan * sim3).sum((-2, -1))[0], atol=1e-4)
    with pytest.raises(ValueError, match="patch features"):
        classifier[0].scores(replace(train, tokens=None), torch.arange(3))


def test_names_fedotp_is_the_transport_plan_and_fedotp_lite_the_default_baseline():
    assert spec("fedotp").patches and not spec("fedotp").one_context and spec("fedotp").ablation
    assert "fedotp-lite" in DEFAULT_METHODS and "fedotp" not in DEFAULT_METHODS
    from pfpl.federation.flower.node import flower_refusal

    assert flower_refusal("fedotp") is None  # the SuperNodes cache patch features too
