"""What every federated prompt-learning method defines, vectorized over clients.

A method owns persistent parameters: *global* ones (no client dimension, synchronised through the
server) and *local* ones (leading client dimension, never leave the client). At each step it turns
the participating clients' slices into differentiable *leaves* and a context ``[B, M, D]``; after
the backward pass it maps the leaves' gradients back onto its persistent parameters. Everything
reaches the loss only through the context, and the context only through the class text features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class Views:
    """One step's differentiable view of the participating clients' prompts."""

    leaves: dict[str, torch.Tensor]  # each [B, ...], requires grad
    ctx: torch.Tensor  # [B, M, D], a function of the leaves
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # constants the gradient map needs


@dataclass
class MethodSettings:
    rank: int = 8
    init_std: float = 0.02
    fedpgp_mu: float = 1.0
    fedpgp_temperature: float = 0.5


class Method(ABC):
    name: str = ""
    global_params: tuple[str, ...] = ()
    local_params: tuple[str, ...] = ()
    # parameters whose per-sample gradients local DP clips and noises (DESIGN §1)
    private_leaves: tuple[str, ...] = ()

    def __init__(self, settings: MethodSettings | None = None):
        self.settings = settings or MethodSettings()

    @property
    def shares(self) -> bool:
        return bool(self.global_params)

    @abstractmethod
    def init(self, n_clients: int, n_ctx: int, dim: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Persistent parameters: global ones ``[...]``, local ones ``[N, ...]``."""

    @abstractmethod
    def views(self, params: dict[str, torch.Tensor], gen: torch.Generator) -> Views:
        """Leaves and context from the participating clients' parameters (global ones expanded to ``[B, ...]``)."""

    def param_grads(self, views: Views, leaf_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of the persistent parameters (``[B, ...]`` each) from the leaves' gradients."""
        return leaf_grads

    def context(self, params: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """The personalised context ``[B, M, D]`` a client releases and is evaluated with."""
        with torch.no_grad():
            return self.views(params, gen).ctx

    def extra_loss(self, views: Views, text_features: torch.Tensor, tower, reference: torch.Tensor | None) -> torch.Tensor | None:
        """A data-independent regulariser added to the loss (FedPGP's contrastive term)."""
        return None


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)
