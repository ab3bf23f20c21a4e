"""``pfpl export`` / ``predict`` of vision prompts (issue 30): a VPT, IVLP, MaPLe or both-tower DP-FPL
prompt leaves a tiny ViT run as a format-2 artifact and classifies images exactly as the run's own
evaluation did; a damaged or ill-fitting one is refused in one line."""

from __future__ import annotations

import json
import struct

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.cli import main
from pfpl.errors import ArtifactError
from pfpl.prompts.artifact import FORMAT_VISION, PromptArtifact, _digest
from tiny_runs import TINY_VISION_RUN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ["vpt", "ivlp", "maple", "dpfpl"]
SMALL = [
    *TINY_VISION_RUN,
    "data.test_per_class_domain=1",
    "prompt.modality='both'",
    "prompt.vision_start=1",  # deep prompts in layers 1 and 2 of the tiny ViT's 3: predict must rebuild that
    f"train.methods={METHODS}",
]
TINY_VIT = {  # tests/conftest.py's tiny_vit, built once for the module
    "embed_dim": 32,
    "vision_cfg": {"layers": 3, "width": 16, "patch_size": 8, "image_size": 32, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _tiny_vit() -> OpenClipBackbone:
    from pfpl.backbones.embedded import build_model

    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    return OpenClipBackbone(model, "tiny-vit", open_clip.image_transform(32, is_train=False), SimpleTokenizer())


@pytest.fixture(scope="module")
def vit():
    """The run's backbone: loaded by the run and by predict (its fingerprint is the one exported)."""
    backbone = _tiny_vit()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pfpl.federation.context.load_backbone", lambda *a, **k: backbone)
        mp.setattr("pfpl.evaluation.predict.load_backbone", lambda *a, **k: backbone)
        yield backbone


@pytest.fixture(scope="module")
def trained(vit, one_torch_thread, tmp_path_factory):
    """A finished one-round run of every vision-prompt method, and its benchmark rebuilt."""
    from pfpl.config import load_config
    from pfpl.federation.context import Benchmark
    from pfpl.federation.runner import run

    tmp = tmp_path_factory.mktemp("release-vision")
    cfg = load_config(None, [*SMALL, f"cache_dir='{tmp / 'cache'}'", f"output_dir='{tmp}'"])
    run(cfg, tmp / "run")
    return tmp / "run", Benchmark(cfg)


def _export(run_dir, method, out, client=0) -> PromptArtifact:
    assert main(["export", str(run_dir), "--method", method, "--client", str(client), "--out", str(out)]) == 0
    return PromptArtifact.load(out)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


@pytest.mark.parametrize("method", METHODS)
def test_an_exported_vision_prompt_predicts_what_the_runs_evaluation_computed(trained, tmp_path, capsys, method):
    from pfpl.artifacts import RunFolder

    run_dir, bench = trained
    out = tmp_path / "prompt.safetensors"
    artifact = _export(run_dir, method, out)
    released = RunFolder(run_dir).load_prompts(method)
    assert artifact.format == FORMAT_VISION and artifact.vision_start == 1
    assert torch.equal(artifact.vision, released.vision[0]) and artifact.vision.shape == (2, 2, 16)
    frozen = method == "vpt"
    assert artifact.text == ("template" if frozen else "context")
    assert (artifact.context is None) if frozen else torch.equal(artifact.context, released.context[0])
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vision_shape"] == [2, 2, 16] and info["vision_start"] == 1 and info["text"] == artifact.text

    # client 0's local test images as PNG files, and what the run's evaluation path computes for them
    index, weight = bench.plan.local[0]
    split = bench.dataset.split("test")
    folder = tmp_path / "images"
    folder.mkdir()
    for k, i in enumerate(index.tolist()):
        split.load(i).save(folder / f"{k:04d}.png")
    image = bench.vision.features(bench.tokens("test")[index], released.vision[0])
    text = bench.reference if frozen else bench.tower(released.context[:1, None])[0]
    expected = (bench.backbone.logit_scale * image @ text.t()).softmax(-1)

    n_classes = len(bench.dataset.classnames)
    assert main(["predict", "--prompt", str(out), str(folder), "--json", "--top-k", str(n_classes)]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = bench.dataset.classnames
    got = torch.zeros(len(rows), n_classes)
    for r, row in enumerate(rows):
        for t in row["top"]:
            got[r, names.index(t["class"])] = t["probability"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    truth = torch.as_tensor(split.labels)[index]
    accuracy = float((weight * (got.argmax(-1) == truth)).sum())
    reported = json.loads((run_dir / "summary.json").read_text())["methods"][method]["per_client"]["local"][0]
    assert accuracy == pytest.approx(reported, abs=1e-5)


def _rewrite(src, dst, edit_meta=None, edit_tensors=None) -> None:
    """``src`` re-saved with its metadata or tensors edited and a fresh digest (a careful forger's file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("digest")
    (edit_meta or (lambda m: None))(meta)
    (edit_tensors or (lambda t: None))(tensors)
    meta["digest"] = _digest(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)


def test_damaged_or_ill_fitting_vision_prompts_are_refused_in_one_line(trained, tmp_path, capsys, monkeypatch, tiny):
    run_dir, _ = trained
    good = tmp_path / "good.safetensors"
    artifact = _export(run_dir, "ivlp", good)
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "red").save(image)

    # one bit of the vision tensor flipped (found through the safetensors header)
    raw = bytearray(good.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + size])["vision"]["data_offsets"]
    raw[8 + size + (begin + end) // 2] ^= 0x40
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(raw))

    def meta(name, **fields):  # metadata edited (or a field dropped: None)
        def edit(m):
            for k, v in fields.items():
                if v is None:
                    del m[k]
                else:
                    m[k] = v

        _rewrite(good, tmp_path / name, edit_meta=edit)
        return tmp_path / name

    def vision(name, change):  # the vision tensor replaced by change(it)
        _rewrite(good, tmp_path / name, edit_tensors=lambda t: t.update(vision=change(t["vision"]).contiguous()))
        return tmp_path / name

    def nan(v):
        v.view(-1)[3] = float("nan")
        return v

    cases = [
        (tampered, ["modified after export"]),
        (meta("no-start.safetensors", vision_start=None), ["missing vision_start"]),
        (meta("depth.safetensors", vision_depth="3"), ["does not match vision_depth"]),
        (meta("text.safetensors", text="template"), ["tensors", "expected ['vision']"]),
        (meta("kind.safetensors", text="image"), ["text 'image'"]),
        (meta("deep.safetensors", vision_start="2"), ["do not fit", "layers 2…3"]),
        (vision("flat.safetensors", lambda v: v[0]), ["vision prompts of shape (2, 16)"]),
        (vision("nan.safetensors", nan), ["NaN"]),
        (vision("wide.safetensors", lambda v: v[..., :8]), ["width 8"]),
    ]
    for path, words in cases:
        assert main(["predict", "--prompt", str(path), str(image)]) == 2, path.name
        _one_line_error(capsys, *words)

    # writing one is checked too: a wrong shape or NaN never reaches a file
    for bad in (torch.zeros(2, 16), torch.full((2, 2, 16), float("nan"))):
        artifact.vision = bad
        with pytest.raises(ArtifactError, match="vision prompts"):
            artifact.save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()

    # vision prompts on a ResNet backbone (same fingerprint, so only the tower's kind is wrong)
    resnet = tmp_path / "resnet.safetensors"
    _rewrite(good, resnet, edit_meta=lambda m: m.update(backbone_fingerprint=tiny.fingerprint))
    monkeypatch.setattr("pfpl.evaluation.predict.load_backbone", lambda *a, **k: tiny)
    assert main(["predict", "--prompt", str(resnet), str(image)]) == 2
    _one_line_error(capsys, "do not fit backbone", "not a ViT")


def test_a_run_folder_without_released_vision_prompts_is_refused_in_one_line(trained, tmp_path, capsys):
    """A prompts file written before runs kept vision prompts: export says so instead of guessing."""
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(trained[0], run_dir)
    prompts = torch.load(run_dir / "prompts-vpt.pt", weights_only=True)
    del prompts["vision"]
    torch.save(prompts, run_dir / "prompts-vpt.pt")
    out = tmp_path / "p.safetensors"
    assert main(["export", str(run_dir), "--method", "vpt", "--client", "0", "--out", str(out)]) == 2
    _one_line_error(capsys, "keeps no released vision prompts", "older")
    assert not out.exists()
