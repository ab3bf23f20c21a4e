import pytest
import torch

from pfpl.backbones.prompt_tower import PromptTower

NAMES = ["red circle", "blue hexagon", "a much longer yellow crescent name"]


def test_eot_truncation_matches_full_77_positions(tiny):
    torch.manual_seed(0)
    truncated = PromptTower(tiny, NAMES, n_ctx=16, truncate=True)
    full = PromptTower(tiny, NAMES, n_ctx=16, truncate=False)
    assert truncated.prefix.shape[1] + truncated.n_ctx + truncated.suffix.shape[1] < 77
    assert full.prefix.shape[1] + full.n_ctx + full.suffix.shape[1] == 77
    ctx = torch.randn(3, 1, 16, tiny.ctx_dim) * 0.5
    assert torch.allclose(truncated(ctx), full(ctx), atol=1e-5)
    class_specific = torch.randn(len(NAMES), 16, tiny.ctx_dim)
    assert torch.allclose(truncated(class_specific), full(class_specific), atol=1e-5)


def test_truncated_gradients_match_full(tiny):
    ctx = (torch.randn(2, 1, 4, tiny.ctx_dim) * 0.1).requires_grad_(True)
    grads = []
    for truncate in (True, False):
        ctx.grad = None
        PromptTower(tiny, NAMES, n_ctx=4, truncate=truncate)(ctx).pow(3).sum().backward()
        grads.append(ctx.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_encode_text_matches_open_clip(tiny):
    texts = ["a photo of a red circle.", "a sketch of a green star."]
    ours = tiny.encode_text(texts)
    ref = torch.nn.functional.normalize(tiny.model.encode_text(tiny.tokenize(texts)), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_prompt_with_handcrafted_context_equals_plain_text(tiny):
    """Splicing the token embeddings of 'a photo of a' as context reproduces the plain sentence."""
    tower = PromptTower(tiny, ["red circle"], n_ctx=4)
    tokens = tiny.tokenize(["a photo of a red circle."])
    ctx = tiny.token_embeddings(tokens)[0, 1:5]
    assert torch.allclose(tower(ctx)[0], tiny.encode_text(["a photo of a red circle."]), atol=1e-5)


def test_batch_chunking_does_not_change_features(tiny):
    ctx = torch.randn(5, 1, 2, tiny.ctx_dim)
    whole = PromptTower(tiny, NAMES, n_ctx=2)(ctx)
    chunked = PromptTower(tiny, NAMES, n_ctx=2, max_sequences=4)(ctx)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_bad_context_shape_is_refused(tiny):
    tower = PromptTower(tiny, NAMES, n_ctx=4)
    with pytest.raises(ValueError, match="context"):
        tower(torch.randn(4, 3, tiny.ctx_dim))
    with pytest.raises(ValueError, match="rows for 3 classes"):
        tower(torch.randn(2, 4, tiny.ctx_dim))


def test_text_tower_runs_on_other_weights_without_touching_the_shared_model(tiny):
    """One party can train the text body (FedSP): functional weights give the frozen tower's features
    when equal to it, receive gradients, change the features when moved, and leave the model as it was."""
    tower = PromptTower(tiny, NAMES, n_ctx=4)
    ctx = torch.randn(2, 1, 4, tiny.ctx_dim) * 0.1
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    frozen = tower(ctx)
    body = tiny.text.trainable_copy()
    assert body and all(k.startswith("transformer.") for k in body)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    same = tower(ctx, params=body)
    assert torch.allclose(same, frozen, atol=1e-6)
    same.pow(3).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body.values())
    with torch.no_grad():
        for p in body.values():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(tower(ctx, params=body), frozen, atol=1e-3)
    assert torch.allclose(tower(ctx), frozen, atol=0)  # the shared model did not move
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_other_weights_keep_eot_truncation(tiny):
    body = tiny.text.trainable_copy()
    truncated = PromptTower(tiny, NAMES, n_ctx=4, truncate=True)
    full = PromptTower(tiny, NAMES, n_ctx=4, truncate=False)
    ctx = torch.randn(2, 1, 4, tiny.ctx_dim) * 0.3
    assert torch.allclose(truncated(ctx, params=body), full(ctx, params=body), atol=1e-5)
