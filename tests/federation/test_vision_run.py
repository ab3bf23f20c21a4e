"""`pfpl run` with vision and both-tower prompts, end to end on a random tiny ViT CLIP: the prompt-free
tokens are cached, the prompted layers run per step, and every client is scored with its own image
features."""

import pytest
import torch

from pfpl.config import load_config
from pfpl.federation import context
from pfpl.federation.runner import run
from tiny_runs import TINY_VISION_RUN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [*TINY_VISION_RUN, "data.test_per_class_domain=1"]


@pytest.fixture
def vit_run(tmp_path, monkeypatch, tiny_vit):
    monkeypatch.setattr(context, "load_backbone", lambda *a, **k: tiny_vit)

    def go(extra):
        paths = [f"cache_dir='{tmp_path / 'cache'}'", f"output_dir='{tmp_path / 'runs'}'"]
        cfg = load_config(None, SMALL + paths + extra)
        return run(cfg, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")

    return go


def test_vision_and_both_tower_methods_run_and_are_scored_per_client(vit_run, tmp_path):
    summary = vit_run(["train.methods=['vpt', 'ivlp', 'maple']"])
    assert set(summary["methods"]) == {"vpt", "ivlp", "maple"}
    for m in summary["methods"].values():
        assert 0 <= m["local"] <= 1 and 0 <= m["neighbor"] <= 1
    cached = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 6  # image features and prompt-free tokens of train, val, test


def test_dpfpl_on_both_towers_releases_global_and_personal_prompts_of_each(vit_run, tmp_path):
    from pfpl.artifacts import RunFolder
    from pfpl.federation.release import export_prompt

    expect = {"both": ({"global", "vglobal"}, {"local", "vlocal"})}  # "vision" alone: tests/algorithms
    for modality, (shared, local) in expect.items():
        summary = vit_run(["train.methods=['dpfpl']", f"prompt.modality={modality}"])
        assert len(summary["methods"]["dpfpl"]["per_client"]["local"]) == 3
        folder = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run-"))[-1]
        released = RunFolder(folder).load_prompts("dpfpl")
        assert set(released.shared) == shared and set(released.local) == local
        vlocal = released.local["vlocal"]
        assert vlocal.shape == (3, 2, 2, 16) and not torch.equal(vlocal[0], vlocal[1])  # personal per client
        assert released.vision.shape == (3, 2, 2, 16)  # kept for export: each client's released vision prompts
        artifact = export_prompt(folder, "dpfpl", 0)
        assert torch.equal(artifact.vision, released.vision[0]) and torch.equal(artifact.context, released.context[0])


def test_a_resnet_backbone_refuses_vision_prompts_in_one_line(tmp_path, monkeypatch, tiny):
    from pfpl.errors import BackboneError

    monkeypatch.setattr(context, "load_backbone", lambda *a, **k: tiny)
    cfg = load_config(None, SMALL + [f"cache_dir='{tmp_path}'", "train.methods=['vpt']"])
    with pytest.raises(BackboneError, match="not a ViT"):
        run(cfg, tmp_path / "run")
    assert torch.get_num_threads() == 1
