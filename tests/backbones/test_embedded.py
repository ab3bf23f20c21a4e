"""The committed embedded model: loads offline, is what its manifest says, and meets the quality bar."""

import json

import pytest

from pfpl.backbones import load_backbone
from pfpl.backbones.embedded import EMBEDDED_CONFIG, MANIFEST_FILE, WEIGHTS_FILE, assets_dir, load_embedded
from pfpl.data import ShapesDataset


def test_weights_are_small_and_described():
    weights = assets_dir() / WEIGHTS_FILE
    assert weights.stat().st_size <= 25 * 1024 * 1024
    manifest = json.loads((assets_dir() / MANIFEST_FILE).read_text())
    assert manifest["config"] == EMBEDDED_CONFIG
    assert manifest["pretraining"]["settings"]["seed"] == 0
    assert {"linear_probe", "zero_shot", "coop"} <= set(manifest["quality"])


def test_loads_offline_without_touching_the_network(no_network):
    backbone = load_backbone("embedded", device="cpu")
    assert backbone.name == "embedded" and backbone.ctx_dim == EMBEDDED_CONFIG["text_cfg"]["width"]
    assert backbone.text.causal
    again = load_backbone("embedded", device="cpu")
    assert again.fingerprint == backbone.fingerprint


def test_manifest_quality_meets_the_probe_bar_and_varies_by_style():
    q = load_embedded()[1]["quality"]
    assert q["linear_probe"]["accuracy"] >= 0.85
    per_domain = q["zero_shot"]["per_domain"].values()
    assert max(per_domain) - min(per_domain) > 0.1, "zero-shot accuracy should differ by style"


def test_manifest_leaves_room_for_prompt_learning():
    q = load_embedded()[1]["quality"]
    zs, coop = q["zero_shot"]["accuracy"], q["coop"]["accuracy"]
    assert 0.35 <= zs <= 0.75
    assert coop >= zs + 0.15
    assert q["class_names"] == ShapesDataset().classnames, "measured on the benchmark's default class names"


def test_zero_shot_recomputed_matches_the_manifest(tmp_path):
    """The manifest's zero-shot figure is reproduced by the project's own code on the held-out split."""
    from pfpl.config import load_config
    from pfpl.data import build_dataset
    from pfpl.data.features import image_features
    from pfpl.evaluation.zeroshot import zero_shot

    cfg = load_config()
    backbone = load_backbone("embedded", device="cpu")
    dataset = build_dataset(cfg.data)
    test = image_features(backbone, dataset, "test", tmp_path)
    result = zero_shot(backbone, test, dataset.classnames, dataset.domainnames, cfg.prompt.template)
    manifest = load_embedded()[1]["quality"]["zero_shot"]
    assert result["accuracy"] == pytest.approx(manifest["accuracy"], abs=1e-6)
    assert backbone.fingerprint == load_embedded()[1]["quality"]["backbone_fingerprint"]


def test_the_vit_variant_carries_the_resnet_variants_frozen_text_tower_and_its_measured_zero_shot(tmp_path):
    """embedded-vit was pretrained against the default variant's text tower, frozen: everything outside
    the image tower is the same tensor in both, and its manifest's zero-shot is what the code recomputes."""
    import torch

    from pfpl.config import load_config
    from pfpl.data import build_dataset
    from pfpl.data.features import image_features
    from pfpl.evaluation.zeroshot import zero_shot

    resnet, _ = load_embedded()
    vit, manifest = load_embedded(name="embedded-vit")
    text = {k: v for k, v in resnet.state_dict().items() if not k.startswith("visual.")}
    other = {k: v for k, v in vit.state_dict().items() if not k.startswith("visual.")}
    assert text.keys() == other.keys() and all(torch.equal(text[k], other[k]) for k in text)
    assert manifest["pretraining"]["settings"]["text_from"] == "embedded"

    cfg = load_config(None, ["backbone.name='embedded-vit'"])
    backbone = load_backbone("embedded-vit", device="cpu")
    dataset = build_dataset(cfg.data)
    test = image_features(backbone, dataset, "test", tmp_path)
    result = zero_shot(backbone, test, dataset.classnames, dataset.domainnames, cfg.prompt.template)
    assert result["accuracy"] == pytest.approx(manifest["quality"]["zero_shot"]["accuracy"], abs=1e-6)
    assert backbone.fingerprint == manifest["quality"]["backbone_fingerprint"]
