"""The workload ``pfpl bench`` times: a backbone from pfpl's one factory, synthetic images and
labels (client c holds classes c·k … c·k + k − 1 of the full label space, one batch each), and two
simulators over the same method, data and streams that differ only in their compute pattern:

* **engine** — image features computed once before timing; every client's ``C`` prompts through
  the text tower in one call, cut to ``max_eot + 1`` positions; one backward for all clients.
* **reference** — the published DP-FPL code's pattern: clients one after another (the simulator's
  one-client calls), the frozen image tower re-run on every batch of raw images
  (:class:`~pfpl.data.clients.ImageClientData`), each client's prompts at the full
  ``context_length`` (77) positions.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones import OpenClipBackbone, PromptTower, load_backbone
from pfpl.benchmarks.settings import METHOD, BenchConfig, validate
from pfpl.config import Config
from pfpl.data.clients import ClientData, ImageClientData
from pfpl.data.features import Features
from pfpl.errors import BenchError
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator
from pfpl.federation.wiring import build_engine

_ADJECTIVES = [
    "red",
    "spotted",
    "golden",
    "northern",
    "great",
    "common",
    "little",
    "black",
    "striped",
    "giant",
    "wild",
    "mountain",
    "sea",
    "desert",
    "snowy",
    "painted",
    "crested",
    "barn",
    "grey",
    "water",
]
_NOUNS = [
    "owl",
    "warbler",
    "sedan",
    "mushroom",
    "tortoise",
    "kingfisher",
    "teapot",
    "lighthouse",
    "axolotl",
    "trombone",
    "chickadee",
    "lemur",
    "snorkel",
    "toucan",
    "harmonica",
    "ibex",
    "pelican",
    "wombat",
    "dragonfly",
    "bison",
    "umbrella",
    "cathedral",
    "hedgehog",
    "macaw",
    "saxophone",
    "jellyfish",
    "canoe",
    "salamander",
    "gondola",
    "meerkat",
]


def class_names(n: int) -> list[str]:
    """``n`` distinct, deterministic class names of ImageNet-like token length (one to three words)."""
    names: list[str] = []
    for i in range(len(_NOUNS) * (1 + len(_ADJECTIVES) + len(_ADJECTIVES) ** 2)):
        if len(names) == n:
            break
        noun = _NOUNS[i % len(_NOUNS)]
        k = i // len(_NOUNS)
        if k == 0:
            names.append(noun)
        elif k <= len(_ADJECTIVES):
            names.append(f"{_ADJECTIVES[k - 1]} {noun}")
        else:
            k -= len(_ADJECTIVES) + 1
            first, second = divmod(k, len(_ADJECTIVES))
            names.append(f"{_ADJECTIVES[first]} {_ADJECTIVES[second]} {noun}")
    if len(names) < n:
        raise BenchError(f"cannot make {n} distinct class names (at most {len(names)})")
    return names


def input_size(backbone: OpenClipBackbone) -> tuple[int, int]:
    size = getattr(backbone.model.visual, "image_size", None)
    if size is None:
        raise BenchError(f"cannot tell the input size of {backbone.name}'s image tower; pass --image-size")
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def weights_note(backbone: OpenClipBackbone) -> str:
    """How the timed backbone got its weights (timings do not depend on them)."""
    return "random" if backbone.name.endswith(":random") else "pretrained"


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _random_weights_expected():
    """The bench times random weights on purpose: silence open_clip's warning about them (only here;
    ``pfpl run`` keeps it, where random weights are usually a mistake)."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@dataclass
class Workload:
    """Backbone, class names, clients' raw images and labels, and the image features computed once."""

    cfg: BenchConfig
    backbone: OpenClipBackbone
    classnames: list[str]
    images: torch.Tensor  # [N·b, 3, H, W] on the device: client c's data is rows c·b … c·b + b − 1
    labels: torch.Tensor  # [N·b]
    features: torch.Tensor  # [N·b, E], computed once (the engine's input)
    engine_tower: PromptTower = field(repr=False)
    reference_tower: PromptTower = field(repr=False)

    @classmethod
    def build(cls, cfg: BenchConfig) -> Workload:
        validate(cfg)
        with torch.random.fork_rng(devices=[]), _random_weights_expected():
            torch.manual_seed(cfg.seed)  # random weights, reproducibly, without touching the global RNG
            backbone = load_backbone(cfg.backbone, None, cfg.device, image_size=cfg.image_size)
        if cfg.rank > min(cfg.n_ctx, backbone.ctx_dim):
            raise BenchError(
                f"--rank {cfg.rank} must be at most min(--n-ctx, text width) = {min(cfg.n_ctx, backbone.ctx_dim)}"
            )
        names = class_names(cfg.num_classes)
        h, w = input_size(backbone)
        gen = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(cfg.clients * cfg.batch_size, 3, h, w, generator=gen).to(backbone.device)
        k = cfg.classes_per_client
        labels = (torch.arange(cfg.clients)[:, None] * k + torch.arange(cfg.batch_size)[None] % k).flatten()
        features = torch.cat([backbone.encode_images(images[i : i + 64]) for i in range(0, len(images), 64)])
        engine_tower = PromptTower(backbone, names, cfg.n_ctx, truncate=True)
        if int(engine_tower.eot.max()) >= backbone.context_length - 1:
            raise BenchError(
                f"--n-ctx {cfg.n_ctx} plus the longest class name do not fit the text context "
                f"({backbone.context_length} tokens)"
            )
        reference_tower = PromptTower(backbone, names, cfg.n_ctx, truncate=False)
        return cls(cfg, backbone, names, images, labels.to(backbone.device), features, engine_tower, reference_tower)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def weights(self) -> str:
        return weights_note(self.backbone)

    def settings(self) -> TrainSettings:
        return TrainSettings(
            rounds=1,
            local_steps=self.cfg.steps,
            batch_size=self.cfg.batch_size,
            sync="step",
            cosine=False,
            seed=self.cfg.seed,
        )

    def clients(self, n: int | None = None) -> list[np.ndarray]:
        b = self.cfg.batch_size
        return [np.arange(c * b, (c + 1) * b) for c in range(n or self.cfg.clients)]

    def engine(self, dp: Config | None = None) -> Simulator:
        """The vectorized engine on the precomputed features (``dp``: a config whose ``dp`` section
        chooses the sample-level mechanism and DP aggregation)."""
        train = Features(self.features, self.labels, torch.zeros_like(self.labels))
        data = ClientData(train, self.clients(), self.device)
        cfg = dp or Config()
        method = get_method(METHOD)(MethodSettings(rank=self.cfg.rank))
        sim, _ = build_engine(
            cfg, METHOD, self.engine_tower, data, self.backbone.logit_scale, settings=self.settings(), method=method
        )
        return sim

    def reference(self, clients: int | None = None) -> Simulator:
        """The reference compute pattern for the first ``clients`` clients (default: all)."""
        data = ImageClientData(self.images, self.labels, self.clients(clients), self.backbone)
        method = get_method(METHOD)(MethodSettings(rank=self.cfg.rank))
        return Simulator(
            method, self.reference_tower, data, self.settings(), self.backbone.logit_scale, one_client_calls=True
        )

    @property
    def engine_positions(self) -> int:
        return int(self.engine_tower.prefix.shape[1] + self.engine_tower.n_ctx + self.engine_tower.suffix.shape[1])

    @property
    def reference_positions(self) -> int:
        return int(
            self.reference_tower.prefix.shape[1] + self.reference_tower.n_ctx + self.reference_tower.suffix.shape[1]
        )
