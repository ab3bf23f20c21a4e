"""What every federated prompt-learning method declares, vectorized over clients.

A method declares its persistent parameters, each with a **scope** (DESIGN §4):

- ``local``: one value per client, never leaves it;
- ``group``: shared inside a group of clients (the server keeps one value per group, ``[G, ...]``;
  a single global prompt is the one-group case; SecFPP's clusters are groups),

and whether it is **private**: in ``per-sample`` DP mode the gradients of its leaves are clipped
and noised on the client (the paper's "local DP"); a non-private shared parameter is clipped per
record on the client and protected where it is aggregated (global DP at the server).

At each step a method turns the participating clients' rows into differentiable *leaves* and a
context ``[B, M, D]`` (or ``[B, C, M, D]`` for class-specific contexts); after the backward pass
it maps the leaves' gradients back onto its persistent parameters. Everything reaches the loss
only through the context, and the context only through the class text features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pfpl.backbones.prompt_tower import PromptTower
    from pfpl.privacy.mechanisms import Head


class Scope(StrEnum):
    LOCAL = "local"
    GROUP = "group"


@dataclass(frozen=True)
class Param:
    """A persistent parameter: its name, where it lives, whether local DP noises it, and whether it
    trains at all (a fixed per-client buffer, e.g. which classes the client holds, does not)."""

    name: str
    scope: Scope
    private: bool = False
    trainable: bool = True


@dataclass(frozen=True)
class Stage:
    """A part of a client's local round: which persistent parameters train in it (None: all)."""

    name: str
    trainable: tuple[str, ...] | None = None


@dataclass
class Views:
    """One step's differentiable view of the participating clients' prompts."""

    leaves: dict[str, torch.Tensor]  # each [B, ...], requires grad
    ctx: torch.Tensor  # [B, M, D] (one context for all classes) or [B, C, M, D], a function of the leaves
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # constants the gradient map needs
    #: ``[B, depth, P, W]`` vision prompts for the image tower (vision / multimodal methods), a function of
    #: the leaves; None: the image features are the cached, prompt-free ones
    vision: torch.Tensor | None = None


@dataclass
class MethodSettings:
    rank: int = 8
    init_std: float = 0.02
    #: ``[n_ctx, D]`` token embeddings of the initialisation phrase (None: random initialisation)
    init_ctx: torch.Tensor | None = None
    fedpgp_mu: float = 1.0
    fedpgp_temperature: float = 0.5
    extra: dict = field(default_factory=dict)  # method-specific settings (e.g. SecFPP's clustering)
    #: which towers a method with a choice prompts (``prompt.modality``: DP-FPL, DP-LoRA)
    modality: str = "text"
    #: ``(depth, tokens, width)`` of one vision prompt set (None: the run has no vision prompts)
    vision_shape: tuple[int, int, int] | None = None
    #: the hand-crafted template, the text classifier of a method that prompts only the image tower
    template: str = "a photo of a {}."


class Method(ABC):
    name: str = ""
    params: tuple[Param, ...] = ()
    #: leaf name -> the persistent parameter its gradient updates (default: the leaf's own name)
    leaf_params: dict[str, str] = {}

    def __init__(self, settings: MethodSettings | None = None):
        self.settings = settings or MethodSettings()

    # ---- declarations --------------------------------------------------------------------------
    @property
    def shared_params(self) -> tuple[str, ...]:
        """Parameters with ``group`` scope: they travel to the server and back."""
        return tuple(p.name for p in self.params if p.scope is Scope.GROUP)

    @property
    def local_params(self) -> tuple[str, ...]:
        """Every per-client parameter (stored, gathered and checkpointed with the client's state)."""
        return tuple(p.name for p in self.params if p.scope is Scope.LOCAL)

    @property
    def trainable_local(self) -> tuple[str, ...]:
        """The per-client parameters the client's optimizer steps."""
        return tuple(p.name for p in self.params if p.scope is Scope.LOCAL and p.trainable)

    @property
    def shares(self) -> bool:
        return bool(self.shared_params)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The differentiable leaves of :meth:`views`: every parameter not rebuilt from other leaves,
        and the leaves of ``leaf_params``."""
        rebuilt = set(self.leaf_params.values())
        own = tuple(p.name for p in self.params if p.name not in rebuilt and p.trainable)
        return own + tuple(self.leaf_params)

    def param_of(self, leaf: str) -> str:
        return self.leaf_params.get(leaf, leaf)

    def is_private_leaf(self, leaf: str) -> bool:
        private = {p.name for p in self.params if p.private}
        return self.param_of(leaf) in private

    # ---- parameters ----------------------------------------------------------------------------
    def start(self, n_ctx: int, dim: int, gen: torch.Generator) -> torch.Tensor:
        """Where a method's main context starts: the initialisation phrase's embeddings, or random."""
        if self.settings.init_ctx is None:
            return normal((n_ctx, dim), self.settings.init_std, gen)
        if tuple(self.settings.init_ctx.shape) != (n_ctx, dim):
            raise ValueError(f"initial context of shape {tuple(self.settings.init_ctx.shape)} for {n_ctx} × {dim}")
        return self.settings.init_ctx.detach().clone()

    def offset(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Where a part added to the main context starts: zero after a phrase (so the sum is the
        phrase), random otherwise."""
        if self.settings.init_ctx is None:
            return normal(shape, self.settings.init_std, gen)
        return torch.zeros(shape)

    @abstractmethod
    def init_shared(self, n_ctx: int, dim: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Initial value of every shared parameter (one copy; the server replicates it per group)."""

    @abstractmethod
    def init_local(
        self, n_ctx: int, dim: int, gen: torch.Generator, held: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Initial value of one client's local parameters, from that client's own stream; ``held``
        (bool ``[C]``) says which classes the client's data holds."""

    @abstractmethod
    def views(self, params: dict[str, torch.Tensor], gens: Sequence[torch.Generator]) -> Views:
        """Leaves and context from the participating clients' rows (shared ones already broadcast to
        ``[B, ...]``); ``gens`` has one generator per client for any random draw the method makes."""

    def param_grads(self, views: Views, leaf_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of the persistent parameters (``[B, ...]`` each) from the leaves' gradients."""
        return leaf_grads

    def context(self, params: dict[str, torch.Tensor], gens: Sequence[torch.Generator]) -> torch.Tensor:
        """The personalised context a client releases and is evaluated with."""
        with torch.no_grad():
            return self.views(params, gens).ctx

    #: whether the method's views carry vision prompts (then its image features depend on them)
    @property
    def prompts_vision(self) -> bool:
        return False

    def vision_prompts(self, params: dict[str, torch.Tensor], gens: Sequence[torch.Generator]) -> torch.Tensor | None:
        """``[B, depth, P, W]``: the vision prompts a client releases and is evaluated with (None: none)."""
        if not self.prompts_vision:
            return None
        with torch.no_grad():
            return self.views(params, gens).vision

    def extra_loss(
        self, views: Views, text_features: torch.Tensor, tower: PromptTower, reference: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A data-independent regulariser added to the loss (FedPGP's contrastive term)."""
        return None

    def stages(self) -> tuple[Stage, ...]:
        """The stages of a local round, each on its own share of the round's batches (default: one)."""
        return (Stage("all"),)

    def prepare(self, tower: PromptTower) -> None:
        """Constants a method derives once from the frozen tower and the class names (FedTPG's class-name
        features); the client update calls it before any step (default: nothing)."""
        return None

    def head(self, views: Views, text_features: torch.Tensor, batch) -> Head | None:
        """The method's own classifier for a training step on ``batch`` (a :class:`~pfpl.data.clients.Batch`),
        when its logits are not ``scale · x · T`` (pFedMoAP's gate, FedOTP's transport plan); None: they are."""
        return None

    def begin_round(self, local: dict[str, torch.Tensor]) -> None:
        """Before a client update's steps: a method may restart local parameters in place (pFedMoAP's
        prompt restarts from the federation's mean it received); default: nothing."""
        return None

    def text_features(self, tower: PromptTower, views: Views) -> torch.Tensor:
        """``[B, C, E]`` class text features of the views' contexts (FedSP runs each client's own text body)."""
        ctx = views.ctx if views.ctx.dim() == 4 else views.ctx[:, None]
        return tower(ctx)

    def release_features(
        self, tower: PromptTower, params: dict[str, torch.Tensor], gens: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """``[N, C, E]``: the class text features every client's released prompt gives (FedSP's is the
        server's full model with the shared prompt)."""
        ctx = self.context(params, gens)
        return tower(ctx if ctx.dim() == 4 else ctx[:, None])

    def upload_extras(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What else a client sends besides its shared parameters (nothing, unless a method says so)."""
        return {}

    def client_handlers(self) -> dict:
        """The client side of this method's server phases: request kind -> ``handler(host, client,
        request) -> reply``, answered from the client's own state on whichever party hosts it."""
        return {}

    def server_phases(self) -> list:
        """Work the server does between rounds (SecFPP's clustering); see
        :class:`pfpl.federation.simulator.ServerPhase`."""
        return []

    def public_facts(self) -> tuple[str, ...]:
        """What this method's released prompt reveals by its structure and treats as public (a private
        run's certificate lists it; empty: nothing beyond :data:`pfpl.privacy.plan.PUBLIC`)."""
        return ()


@dataclass
class Classifier:
    """Released classifiers that are not one class-text-feature matrix per client (their logits depend
    on the image: pFedMoAP's gate, FedOTP's transport plan). ``scores(row, features, index)`` gives client
    row ``row``'s ``[n, C]`` class scores of ``features``' records ``index``; evaluation takes it where it
    takes text features ``[N, C, E]`` (``classifier[row].scores(features, index)``)."""

    fn: Callable  # (row, features, index) -> [n, C]
    rows: int
    #: scores by the records' patch features (``Features.tokens``: FedOTP), which the caller attaches
    needs_tokens: bool = False

    def to(self, device) -> Classifier:
        return self

    def dim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> _Row:
        return _Row(self, int(row))


@dataclass
class _Row:
    classifier: Classifier
    row: int

    def scores(self, features, index: torch.Tensor) -> torch.Tensor:
        return self.classifier.fn(self.row, features, index)


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)
