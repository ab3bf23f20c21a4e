"""Shared tiny fixtures: random tiny CLIPs, a tiny shapes dataset, random features, a network guard."""

from __future__ import annotations

import socket

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.data.features import Features
from pfpl.data.shapes_dataset import ShapesDataset

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["red circle", "blue star", "green ring", "yellow arrow", "red cross", "blue square"]


def _tiny_backbone(seed: int = 0) -> OpenClipBackbone:
    from pfpl.backbones.embedded import build_model

    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG)
    return OpenClipBackbone(model, f"tiny-{seed}", open_clip.image_transform(32, is_train=False), SimpleTokenizer())


def _random_features(backbone: OpenClipBackbone, n: int, seed: int = 0) -> Features:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    feats = torch.nn.functional.normalize(
        torch.randn(n, backbone.model.text_projection.shape[1], generator=gen), dim=-1
    )
    return Features(feats, labels, torch.zeros(n, dtype=torch.long))


@pytest.fixture
def tiny_config() -> dict:
    """The tiny open_clip architecture the tests build random models of."""
    return TINY_CONFIG


@pytest.fixture
def classes() -> list[str]:
    return list(CLASSES)


@pytest.fixture
def tiny_backbone():
    """A factory: ``tiny_backbone(seed)`` is a random tiny CLIP."""
    return _tiny_backbone


@pytest.fixture
def tiny() -> OpenClipBackbone:
    return _tiny_backbone(0)


TINY_VIT_CONFIG = {
    **TINY_CONFIG,
    "vision_cfg": {"layers": 3, "width": 16, "patch_size": 8, "image_size": 32, "head_width": 8},
}


@pytest.fixture
def tiny_vit() -> OpenClipBackbone:
    """A random tiny CLIP whose image tower is a ViT (it can carry vision prompts)."""
    from pfpl.backbones.embedded import build_model

    torch.manual_seed(0)
    model = build_model(TINY_VIT_CONFIG)
    return OpenClipBackbone(model, "tiny-vit", open_clip.image_transform(32, is_train=False), SimpleTokenizer())


@pytest.fixture
def random_features():
    """A factory: ``random_features(backbone, n, seed)`` is ``n`` random unit image features labelled
    round-robin over the tiny class list."""
    return _random_features


@pytest.fixture
def tiny_dataset() -> ShapesDataset:
    return ShapesDataset(seed=1, per_class_domain={"train": 1, "val": 1, "test": 1}, image_size=32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' ops are too small to share out: one thread keeps tests fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
