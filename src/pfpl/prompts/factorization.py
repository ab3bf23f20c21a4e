"""DP-FPL's per-step low-rank factorization of the local prompt and its gradient rebuild (Eq. 4).

At every step the local prompt P [M, D] is written as P = u·v + r with one power-iteration step
from a fresh random start: v₀ ~ N(0, 1) [D, k]; u = orthonormalise(P v₀) [M, k];
v = orthonormalise(Pᵀ u)ᵀ [k, D]; r = P − u·v. Only u and v receive (noised) gradients; the local
update is rebuilt with the paper's Eq. 4, ∇P = (∇u)v + u(∇v) − u uᵀ(∇u)v, as written (the
published code flips the last sign and divides by 10; pfpl does neither).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pfpl.streams import randn_rows


def orthonormalise(x: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt on the columns of ``x`` [..., n, k] (via reduced QR, signs fixed to R's diagonal)."""
    q, r = torch.linalg.qr(x, mode="reduced")
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def factorize(
    p: torch.Tensor, rank: int, gens: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [B, M, k], v [B, k, D], r [B, M, D]) for prompts ``p`` [B, M, D]; client ``i``'s random
    start comes from ``gens[i]``, so a client factorizes the same alone or in a batch."""
    m, d = p.shape[-2:]
    if not 1 <= rank <= min(m, d):
        raise ValueError(f"rank {rank} must be between 1 and min(n_ctx, dim) = {min(m, d)}")
    if len(gens) != p.shape[0]:
        raise ValueError(f"{len(gens)} generators for {p.shape[0]} prompts")
    v0 = randn_rows(gens, (d, rank), p.device, p.dtype)
    u = orthonormalise(p @ v0)
    v = orthonormalise(p.transpose(-1, -2) @ u).transpose(-1, -2)
    return u, v, p - u @ v


def eq4_gradient(grad_u: torch.Tensor, grad_v: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 4: ∇P = (∇u)v + u(∇v) − u uᵀ(∇u)v, batched over leading dims."""
    return grad_u @ v + u @ grad_v - u @ (u.transpose(-1, -2) @ grad_u) @ v
