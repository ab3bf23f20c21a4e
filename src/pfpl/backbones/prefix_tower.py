"""The text tower with a shared prompt prefix computed once per prompt set, not once per class.

With a class-agnostic context, ``[SOS] ctx_1 … ctx_M`` is the same for every class of a prompt set,
and the tower is causal, so those M + 1 positions have the same hidden states in every class's
sequence. This runs them once per prompt set, keeps each layer's keys and values, and runs only the
per-class suffix (``classname . [EOS]``) for every class, attending to the cached prefix. Gradients
reach the context through the prefix's keys and values. It reads the open_clip blocks' own weights
(layer norms, attention projections, MLP, layer scale), so it works for any open_clip text tower
built from ``ResidualAttentionBlock``s with a causal mask and EOT pooling; :func:`supports` says
whether a tower qualifies (callers fall back to the full sequences otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfpl.backbones.openclip import TextTower

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
_UNSUPPORTED_PARTS = ("ln_1_kv", "ln_attn", "ln_inner")  # cross-attention, scaled-cosine variants


def _plain_attention(attn: nn.Module) -> bool:
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and (attn.dropout == 0 or not attn.training)
    )


def supports(tower: TextTower) -> bool:
    """Whether the prefix can be shared: causal mask, EOT pooling, batch-first plain blocks."""
    transformer = tower.transformer
    blocks = getattr(transformer, "resblocks", None)
    if not tower.causal or blocks is None or not getattr(transformer, "batch_first", False):
        return False
    for blk in blocks:
        if not all(hasattr(blk, p) for p in _BLOCK_PARTS) or any(hasattr(blk, p) for p in _UNSUPPORTED_PARTS):
            return False
        if not _plain_attention(blk.attn):
            return False
    return True


def _qkv(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values ``[N, H, L, Dh]`` of ``x`` ``[N, L, D]``, with the block's projections."""
    n, length, _ = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention as two matmuls (what open_clip's blocks compute when they train here; the
    FLOP counter of ``pfpl bench`` sees matmuls, not a fused CPU kernel)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def _merge(attn: nn.MultiheadAttention, out: torch.Tensor) -> torch.Tensor:
    n, h, length, dh = out.shape
    return F.linear(out.transpose(1, 2).reshape(n, length, h * dh), attn.out_proj.weight, attn.out_proj.bias)


def prefix_shared_features(
    tower: TextTower, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor
) -> torch.Tensor:
    """Projected, unnormalised text features ``[B, C, E]``.

    ``prefix``: ``[B, P, D]`` token embeddings shared by all classes of prompt set b (SOS and the
    context); ``suffix``: ``[C, S, D]`` (or ``[B, C, S, D]``) the per-class rest, cut after the last
    EOT; ``eot``: ``[C]`` each class's EOT position in the whole sequence (≥ P).
    """
    b, p, d = prefix.shape
    if suffix.dim() == 3:
        suffix = suffix[None].expand(b, -1, -1, -1)
    c, s = suffix.shape[1], suffix.shape[2]
    pos = tower.positional_embedding.to(prefix.dtype)
    xp = prefix + pos[:p]
    xs = (suffix.to(prefix.dtype) + pos[p : p + s]).reshape(b * c, s, d)
    ones = torch.ones(s, p + s, dtype=torch.bool, device=prefix.device)
    mask = torch.cat([ones[:, :p], torch.tril(ones[:, p:])], dim=1)  # suffix i sees the prefix and suffix ≤ i
    causal = torch.tril(torch.ones(p, p, dtype=torch.bool, device=prefix.device))
    at = (eot.to(prefix.device) - p).repeat(b)  # each sequence's EOT, counted within its suffix
    rows = torch.arange(b * c, device=prefix.device)
    blocks = list(tower.transformer.resblocks)
    for i, blk in enumerate(blocks):
        attn, last = blk.attn, i == len(blocks) - 1
        qp, kp, vp = _qkv(attn, blk.ln_1(xp))
        if not last:  # the last block reads only the prefix's keys and values, never its outputs
            xp = xp + blk.ls_1(_merge(attn, _attend(qp, kp, vp, causal)))
            xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
        qs, ks, vs = _qkv(attn, blk.ln_1(xs))
        h, dh = attn.num_heads, attn.head_dim
        k = torch.cat([kp[:, None].expand(b, c, h, p, dh).reshape(b * c, h, p, dh), ks], dim=2)
        v = torch.cat([vp[:, None].expand(b, c, h, p, dh).reshape(b * c, h, p, dh), vs], dim=2)
        allowed = mask
        if last:  # only the EOT position is pooled: the last block runs its query and MLP alone
            xs, qs, allowed = xs[rows, at][:, None], qs[rows, :, at][:, :, None], mask[at][:, None, None]
        xs = xs + blk.ls_1(_merge(attn, _attend(qs, k, v, allowed)))
        xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    x = tower.ln_final(xs[:, 0])
    if tower.text_projection is not None:
        x = tower.text_projection(x) if isinstance(tower.text_projection, nn.Linear) else x @ tower.text_projection
    return x.reshape(b, c, -1)
