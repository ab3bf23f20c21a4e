"""The prompted image tower equals open_clip's own forward with the prompt tokens spliced in (by hooks
on its modules), features and gradients, for shallow and deep prompts, and vectorized over clients."""

import pytest
import torch
from open_clip.model import CLIP

from pfpl.backbones.vision_tower import PromptedVision, supports
from pfpl.errors import BackboneError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def _vit(**vision) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"layers": 4, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16, **vision}
    model = CLIP(embed_dim=24, vision_cfg=cfg, text_cfg=TEXT)
    return model.visual.eval().requires_grad_(False)


def _reference(visual, images: torch.Tensor, prompts: torch.Tensor, start: int) -> torch.Tensor:
    """open_clip's ``visual(images)`` with the prompts spliced in by hooks: after the class token
    before ``ln_pre`` (or before block ``start``), replacing them before each deeper prompted block,
    and dropped from the transformer's output before pooling."""
    depth, p = prompts.shape[:2]
    blocks = visual.transformer.resblocks
    hooks = []

    def insert(x, prompt):
        return torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

    if start == 0:
        hooks.append(visual.ln_pre.register_forward_pre_hook(lambda m, a: (insert(a[0], prompts[0]),)))
    else:
        hooks.append(blocks[start].register_forward_pre_hook(lambda m, a: (insert(a[0], prompts[0]),)))
    for i in range(1, depth):
        replace = lambda m, a, i=i: (insert(torch.cat([a[0][:, :1], a[0][:, 1 + p :]], 1), prompts[i]),)
        hooks.append(blocks[start + i].register_forward_pre_hook(replace))
    hooks.append(
        visual.transformer.register_forward_hook(lambda m, a, out: torch.cat([out[:, :1], out[:, 1 + p :]], 1))
    )
    try:
        out = visual(images)
    finally:
        for h in hooks:
            h.remove()
    return torch.nn.functional.normalize(out, dim=-1)


CASES = [
    ({}, 1, 0),  # shallow
    ({}, 3, 0),  # deep, from the input
    ({}, 2, 1),  # deep, from layer 1 (the cache holds layer 0's output)
    ({"pool_type": "avg"}, 4, 0),
    ({"final_ln_after_pool": True}, 2, 2),
]


@pytest.mark.parametrize(("vision", "depth", "start"), CASES)
def test_prompted_tower_equals_open_clip_forward_with_tokens_spliced_in(vision, depth, start):
    visual = _vit(**vision)
    tower = PromptedVision(visual, n_tokens=3, depth=depth, start=start)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=gen)
    prompts = (torch.randn(depth, 3, 32, generator=gen) * 0.5).requires_grad_(True)
    weights = torch.randn(5, 24, generator=gen)

    ours = tower(tower.fixed(images)[None], prompts[None])[0]
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), prompts)
    ref = _reference(visual, images, prompts, start)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), prompts)

    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    assert g_ref[-1].abs().max() > 1e-4  # the deepest prompt reaches the feature
    plain = torch.nn.functional.normalize(visual(images), dim=-1)
    assert (ours - plain).abs().max() > 1e-3  # the prompts change the features


def test_one_call_for_many_clients_equals_each_client_alone():
    visual = _vit()
    tower = PromptedVision(visual, n_tokens=2, depth=2)
    gen = torch.Generator().manual_seed(2)
    tokens = tower.fixed(torch.randn(6, 3, 32, 32, generator=gen)).view(3, 2, -1, 32)
    prompts = torch.randn(3, 2, 2, 32, generator=gen)
    together = tower(tokens, prompts)
    alone = torch.cat([tower(tokens[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    per_record = tower(tokens, prompts[:, None].expand(3, 2, 2, 2, 32))
    assert together.shape == (3, 2, 24)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(together, per_record, atol=1e-6)


def test_a_resnet_image_tower_and_prompts_deeper_than_the_tower_are_refused():
    resnet = CLIP(24, {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 16}, TEXT).visual
    assert not supports(resnet)
    with pytest.raises(BackboneError, match="not a ViT"):
        PromptedVision(resnet, 2)
    with pytest.raises(BackboneError, match="do not fit"):
        PromptedVision(_vit(), 2, depth=4, start=1)


@pytest.mark.slow
def test_random_weight_vit_b_16_prompted_tower_equals_open_clip_and_trains_vpt(classes):
    """The same check on open_clip's own ViT-B-16 (random weights, never downloaded), and one step of
    VPT, IVLP, MaPLe and DP-FPL on both towers through the engine on it."""
    import numpy as np

    from pfpl.algorithms import get_method
    from pfpl.algorithms.base import MethodSettings
    from pfpl.backbones import load_backbone
    from pfpl.backbones.prompt_tower import PromptTower
    from pfpl.data.clients import ClientData
    from pfpl.data.features import Features
    from pfpl.federation.client import TrainSettings
    from pfpl.federation.simulator import Simulator

    backbone = load_backbone("ViT-B-16", device="cpu")
    visual = backbone.model.visual
    tower = PromptedVision(visual, n_tokens=2, depth=2, start=10)  # deep prompts in the last two layers
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 224, 224, generator=gen)
    prompts = (torch.randn(2, 2, 768, generator=gen) * 0.5).requires_grad_(True)
    weights = torch.randn(2, 512, generator=gen)
    tokens = tower.fixed(images)
    ours = tower(tokens[None], prompts[None])[0]
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), prompts)
    ref = _reference(visual, images, prompts, 10)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), prompts)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(g_ours, g_ref, atol=1e-5)

    text = PromptTower(backbone, classes, n_ctx=2)
    text.vision = tower
    feats = Features(backbone.encode_images(images), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long))
    data = ClientData(feats, [np.array([0]), np.array([1])], tokens=tokens)
    # every vision method (DP-FPL on both towers too) trains one step on it, and its vision prompts move
    for name, modality in [("vpt", "text"), ("ivlp", "text"), ("maple", "text"), ("dpfpl", "both")]:
        settings = MethodSettings(vision_shape=tower.shape, template="a photo of a {}.", modality=modality, rank=1)
        sim = Simulator(
            get_method(name)(settings), text, data, TrainSettings(rounds=1, local_steps=1, batch_size=1), scale=100.0
        )
        start = sim.vision_prompts().clone()
        sim.run_round()
        assert not torch.equal(sim.vision_prompts(), start), name
