"""The embedded tiny CLIP: an open_clip architecture with a custom config, shipped with pfpl.

Its weights are pretrained on the shapes world by ``pfpl pretrain-embedded`` and committed as
safetensors (stored in float16 to stay small, loaded as float32) next to a manifest that records
the config, seed, data recipe and measured quality.

Two variants: ``embedded`` (the default; a ResNet image tower) and ``embedded-vit`` (a ViT image
tower of the same text tower's shape, which can carry vision prompts; ``pfpl pretrain-embedded
--variant embedded-vit``). Each has its own weights and manifest files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP

EMBEDDED_NAME = "embedded"
EMBEDDED_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"layers": [1, 1, 1, 1], "width": 32, "image_size": 64, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
EMBEDDED_VIT_NAME = "embedded-vit"
EMBEDDED_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"layers": 4, "width": 64, "patch_size": 8, "image_size": 64, "head_width": 32},
    "text_cfg": dict(EMBEDDED_CONFIG["text_cfg"]),
}
#: variant name -> architecture
VARIANTS: dict[str, dict[str, Any]] = {EMBEDDED_NAME: EMBEDDED_CONFIG, EMBEDDED_VIT_NAME: EMBEDDED_VIT_CONFIG}
WEIGHTS_FILE = "embedded.safetensors"
MANIFEST_FILE = "embedded.json"


def files_of(name: str = EMBEDDED_NAME) -> tuple[str, str]:
    """(weights, manifest) file names of an embedded variant."""
    if name not in VARIANTS:
        raise ValueError(f"embedded variant {name!r} is unknown; known: {', '.join(VARIANTS)}")
    return (WEIGHTS_FILE, MANIFEST_FILE) if name == EMBEDDED_NAME else (f"{name}.safetensors", f"{name}.json")


def assets_dir() -> Path:
    """Folder inside the installed package that holds the committed weights and manifest."""
    return Path(str(resources.files("pfpl.backbones") / "assets"))


def build_model(config: dict[str, Any] | None = None) -> CLIP:
    """A randomly initialised model of the embedded architecture."""
    cfg = dict(config or EMBEDDED_CONFIG)
    vision = dict(cfg["vision_cfg"])
    if isinstance(vision["layers"], list | tuple):  # a ResNet's stages; a ViT's depth is an int
        vision["layers"] = tuple(vision["layers"])
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=dict(cfg["text_cfg"]))


def _pretrain_hint(name: str) -> str:
    return "`pfpl pretrain-embedded" + ("" if name == EMBEDDED_NAME else f" --variant {name}") + "`"


def load_manifest(folder: Path | None = None, name: str = EMBEDDED_NAME) -> dict[str, Any]:
    path = (folder or assets_dir()) / files_of(name)[1]
    if not path.exists():
        raise FileNotFoundError(f"embedded model manifest not found at {path}; run {_pretrain_hint(name)} to create it")
    return json.loads(path.read_text())


def load_embedded(folder: Path | None = None, name: str = EMBEDDED_NAME) -> tuple[CLIP, dict[str, Any]]:
    """The pretrained embedded model ``name`` (float32, eval mode) and its manifest. Never downloads."""
    from safetensors.torch import load_file

    folder = folder or assets_dir()
    manifest = load_manifest(folder, name)
    weights = folder / files_of(name)[0]
    if not weights.exists():
        raise FileNotFoundError(f"embedded weights not found at {weights}; run {_pretrain_hint(name)}")
    model = build_model(manifest["config"])
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.eval(), manifest


def save_embedded(model: CLIP, manifest: dict[str, Any], folder: Path) -> Path:
    """Write float16 weights and the manifest (of the variant ``manifest["name"]``); returns the weights path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = folder / files_of(manifest.get("name", EMBEDDED_NAME))[0]
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    write_manifest(manifest, folder)
    return path


def write_manifest(manifest: dict[str, Any], folder: Path | None = None) -> Path:
    """Rewrite the manifest only (e.g. re-measured quality); the weights stay as they are."""
    path = (folder or assets_dir()) / files_of(manifest.get("name", EMBEDDED_NAME))[1]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def record_quality(manifest: dict[str, Any], quality: dict[str, Any], command: str, folder: Path | None) -> Path:
    """Put measured quality into an embedded manifest and rewrite only the manifest file."""
    manifest["quality"], manifest["quality_command"] = quality, command
    return write_manifest(manifest, folder)
