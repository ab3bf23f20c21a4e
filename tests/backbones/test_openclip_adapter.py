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
    with pytest.raises(BackboneError, match="another architecture than pfpl-test-tiny"):
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


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"hello", b""])
def test_a_garbage_checkpoint_is_one_line_that_says_what_is_wrong(no_network, tmp_path, content):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(content)
    for model in ("RN50", "ViT-B-16"):
        with pytest.raises(BackboneError) as err:
            load_open_clip(model, str(bad))
        message = str(err.value)
        assert "\n" not in message and model in message
        assert "empty" in message or "not a PyTorch" in message


def test_a_damaged_or_foreign_checkpoint_is_one_line(no_network, tmp_path, tiny_config):
    import zipfile

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "pfpl-test-tiny2.json").write_text(json.dumps(tiny_config))
    open_clip.add_model_config(cfg_dir)
    good = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("pfpl-test-tiny2").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackboneError, match="damaged or not an open_clip") as err:
        load_open_clip("pfpl-test-tiny2", str(truncated))
    assert "\n" not in str(err.value)
    assert zipfile.is_zipfile(good)
    with pytest.raises(BackboneError, match="another architecture than RN50"):
        load_open_clip("RN50", str(good))


def test_a_tag_resolves_from_the_local_cache_only_and_fails_at_once(no_network, tmp_path, capfd):
    import time

    start = time.perf_counter()
    with pytest.raises(BackboneError, match="needs a download"):
        load_open_clip("RN50", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5  # no request, no retries
    assert capfd.readouterr().err.strip() == ""  # and not a warning printed
    (tmp_path / "RN50.pt").write_bytes(b"\x80not really")  # open_clip's URL cache file for the tag
    with pytest.raises(BackboneError) as err:
        load_open_clip("RN50", "openai", cache_dir=str(tmp_path))
    assert "needs a download" not in str(err.value)  # the cached file was found (and is not a model)
