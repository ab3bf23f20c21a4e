"""The prefix-shared text tower equals the full per-class sequences: features, prompt gradients and
per-record (batched) gradients, on the embedded model and on random-weight open_clip towers."""

import copy

import pytest
import torch

from pfpl.backbones import load_backbone
from pfpl.backbones.prefix_tower import supports
from pfpl.backbones.prompt_tower import PromptTower

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["cat", "a much longer yellow crescent name", "red circle", "x"]  # different token lengths


def _both(backbone, n_ctx=4, names=NAMES):
    return (
        PromptTower(backbone, names, n_ctx, share_prefix=True),
        PromptTower(backbone, names, n_ctx, share_prefix=False),
    )


def _check(backbone, n_ctx=4):
    shared, full = _both(backbone, n_ctx)
    assert shared.share_prefix and not full.share_prefix
    torch.manual_seed(0)
    ctx = (torch.randn(3, 1, n_ctx, backbone.ctx_dim) * 0.1).requires_grad_(True)
    grads, weights = [], None
    for tower in (shared, full):
        out = tower(ctx)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if weights is None else weights
        (grad,) = torch.autograd.grad((out * weights).sum(), ctx)
        grads.append((out.detach(), grad))
    (f1, g1), (f2, g2) = grads
    assert f1.shape[:2] == (3, len(NAMES))
    assert torch.allclose(f1, f2, atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)
    assert g1.abs().max() > 1e-3  # the gradient is not trivially zero


def test_prefix_sharing_equals_full_sequences_on_the_embedded_model():
    _check(load_backbone("embedded"), n_ctx=16)


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_prefix_sharing_equals_full_sequences_on_random_open_clip_text_towers(name):
    torch.manual_seed(0)
    _check(load_backbone(name, device="cpu"))


def test_one_shared_context_and_a_batch_of_prompt_sets_chunked_to_the_budget():
    backbone = load_backbone("embedded")
    shared, full = _both(backbone)
    shared.max_sequences = 5  # one prompt set (4 classes) per chunk
    ctx = torch.randn(4, backbone.ctx_dim) * 0.1
    assert torch.allclose(shared(ctx), full(ctx), atol=1e-5)
    many = torch.randn(3, 1, 4, backbone.ctx_dim) * 0.1
    assert torch.allclose(shared(many), full(many), atol=1e-5)


def test_per_record_gradients_through_the_shared_prefix_match():
    """Per-sample DP backpropagates batched cotangents (``is_grads_batched``) through the tower."""
    backbone = load_backbone("embedded")
    shared, full = _both(backbone)
    ctx = (torch.randn(2, 1, 4, backbone.ctx_dim) * 0.1).requires_grad_(True)
    cot = torch.randn(5, *full(ctx).shape)
    out = [torch.autograd.grad(t(ctx), ctx, cot, is_grads_batched=True)[0] for t in (shared, full)]
    assert out[0].shape == (5, 2, 1, 4, backbone.ctx_dim)
    assert torch.allclose(out[0], out[1], atol=1e-5, rtol=1e-4)


def test_class_specific_contexts_and_other_weights_take_the_full_path():
    backbone = load_backbone("embedded")
    shared, full = _both(backbone)
    csc = torch.randn(len(NAMES), 4, backbone.ctx_dim) * 0.1
    assert shared._shared_context(csc) is None
    assert torch.allclose(shared(csc), full(csc), atol=1e-6)
    params = backbone.text.trainable_copy()
    ctx = torch.randn(1, 1, 4, backbone.ctx_dim) * 0.1
    assert torch.allclose(shared(ctx, params), full(ctx, params), atol=1e-6)


def test_a_tower_without_a_causal_mask_is_not_shared():
    backbone = load_backbone("embedded")
    assert supports(backbone.text)
    open_mask = copy.copy(backbone.text)
    open_mask.attn_mask = torch.zeros_like(backbone.text.attn_mask)
    assert not supports(open_mask)
