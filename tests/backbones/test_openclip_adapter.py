import json

import open_clip
import pytest
import torch

from pfpl.backbones import BackboneError, load_backbone
from pfpl.backbones.openclip import load_open_clip, weights_fingerprint


def test_pretrained_tag_offline_fails_with_one_clear_line(no_network, tmp_path):
    with pytest.raises(BackboneError) as err:
        load_open_clip("RN50", "openai", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert "never downloads" in message and "local checkpoint" in message and "backbone.pretrained" in message


def test_unknown_model_and_tag_and_path_are_named(no_network, tmp_path):
    with pytest.raises(BackboneError, match="not an open_clip model"):
        load_open_clip("ViT-Nope-1")
    with pytest.raises(BackboneError, match="neither a local file nor a known tag"):
        load_open_clip("RN50", "no-such-tag", cache_dir=str(tmp_path))
    with pytest.raises(BackboneError, match="no such checkpoint file"):
        load_open_clip("RN50", str(tmp_path / "missing.pt"))


def test_any_model_name_loads_a_local_checkpoint(no_network, tmp_path, tiny_config):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "pfpl-test-tiny.json").write_text(json.dumps(tiny_config))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(3)
    model = open_clip.create_model("pfpl-test-tiny")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    backbone = load_open_clip("pfpl-test-tiny", str(ckpt))
    assert backbone.fingerprint == weights_fingerprint(model, "pfpl-test-tiny:" + str(ckpt))
    for key, value in model.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value)
    with pytest.raises(BackboneError, match="cannot load it into"):
        bad = tmp_path / "bad.pt"
        torch.save({"nonsense": torch.zeros(1)}, bad)
        load_open_clip("pfpl-test-tiny", str(bad))


def test_fingerprint_changes_with_any_weight(tiny):
    before = weights_fingerprint(tiny.model, "m")
    with torch.no_grad():
        next(tiny.model.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(tiny.model, "m") != before


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackboneError, match="no CUDA device"):
        load_backbone("embedded", device="cuda")
