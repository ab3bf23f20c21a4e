"""The prompt artifact format: a faithful round trip, and one clear error for every bad file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pfpl.errors import ArtifactError
from pfpl.prompts.artifact import PromptArtifact


def _artifact(context=None) -> PromptArtifact:
    return PromptArtifact(
        context=torch.randn(4, 8) if context is None else context,
        classnames=["red circle", "blue star", "green ring"],
        template="a photo of a {}.",
        backbone="embedded",
        backbone_fingerprint="00ff00ff00ff00ff",
        method="dpfpl",
        client=3,
        certificate={"epsilon": 1.5, "delta": 1e-5, "dp_mode": "feature"},
        provenance={"local_accuracy": 0.9},
    )


@pytest.mark.parametrize("context", [torch.randn(4, 8), torch.randn(3, 4, 8)])
def test_round_trip_keeps_every_field(tmp_path, context):
    a = _artifact(context)
    a.save(tmp_path / "a.safetensors")
    b = PromptArtifact.load(tmp_path / "a.safetensors")
    assert torch.equal(a.context, b.context) and b.n_ctx == 4
    for name in ("classnames", "template", "backbone", "backbone_fingerprint", "method", "client", "certificate"):
        assert getattr(a, name) == getattr(b, name)
    assert b.provenance == a.provenance and b.backbone_pretrained is None


def test_bad_files_are_refused_with_the_reason(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"context": torch.zeros(2, 2)}, str(plain))  # safetensors, but no pfpl metadata
    foreign = tmp_path / "foreign.safetensors"
    save_file({"context": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pfpl-prompt/1"})
    for path, words in [(plain, "not a pfpl prompt artifact"), (foreign, "incomplete pfpl prompt artifact")]:
        with pytest.raises(ArtifactError, match=words):
            PromptArtifact.load(path)
    edited = tmp_path / "edited.safetensors"
    a = _artifact()
    a.save(edited)
    raw = edited.read_bytes().replace(b"red circle", b"red square")  # metadata edited after export
    edited.write_bytes(raw)
    with pytest.raises(ArtifactError, match="modified after export"):
        PromptArtifact.load(edited)
    for bad in (torch.randn(2, 4, 8), torch.full((4, 8), float("nan"))):
        with pytest.raises(ArtifactError, match="context"):
            _artifact(bad).save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("context", [torch.randn(4, 8), None])  # None: a frozen-text method (VPT)
def test_vision_prompts_round_trip_as_format_2(tmp_path, context):
    from pfpl.prompts.artifact import FORMAT_VISION

    a = _artifact(context)
    a.context, a.vision, a.vision_start = context, torch.randn(2, 3, 16), 1
    a.save(tmp_path / "v.safetensors")
    b = PromptArtifact.load(tmp_path / "v.safetensors")
    assert b.format == FORMAT_VISION and torch.equal(b.vision, a.vision) and b.vision_start == 1
    assert b.text == ("template" if context is None else "context") and b.n_ctx == (0 if context is None else 4)
    assert (b.context is None) if context is None else torch.equal(b.context, context)


def test_a_prompt_without_vision_is_still_format_1_with_its_old_digest(tmp_path):
    """Text-only artifacts keep format 1 byte for byte, so files written before vision prompts (and
    readers from before) still agree."""
    import hashlib
    import json

    from safetensors import safe_open

    a = _artifact()
    a.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, context = dict(f.metadata()), f.get_tensor("context")
    assert meta["format"] == "pfpl-prompt/1" and not {"text", "vision_start"} & set(meta)
    digest = meta.pop("digest")
    h = hashlib.sha256()  # format 1's digest, as pfpl computed it before format 2
    h.update(f"{tuple(context.shape)}:{context.dtype}".encode())
    h.update(context.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: meta[k] for k in sorted(meta)}).encode())
    assert h.hexdigest() == digest
