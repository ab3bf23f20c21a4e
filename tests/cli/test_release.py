"""``pfpl export`` / ``inspect`` / ``predict``: a trained prompt leaves the run as a safetensors file
with its privacy certificate, and classifies images as well as the run said it would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pfpl.cli import main
from pfpl.prompts.artifact import PromptArtifact

SMALL = [
    "federation.n_clients=5",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "data.train_per_class_domain=2",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "train.methods=['dpfpl', 'secfpp']",
    "prompt.n_ctx=4",
    "train.rank=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run of DP-FPL (shared context) and SecFPP (class-specific contexts)."""
    tmp = tmp_path_factory.mktemp("release")
    run = tmp / "run"
    sets = [a for s in [*SMALL, f"cache_dir='{tmp / 'cache'}'"] for a in ("--set", s)]
    assert main(["run", "-q", "--json", "--out", str(run), *sets]) == 0
    return run


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


@pytest.mark.parametrize("method", ["dpfpl", "secfpp"])
def test_a_prompt_exported_from_a_run_predicts_with_the_accuracy_the_run_reported(trained, tmp_path, capsys, method):
    from pfpl.config import build_config
    from pfpl.federation.context import Benchmark

    out = tmp_path / "prompt.safetensors"
    assert main(["export", str(trained), "--method", method, "--client", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cert = info["certificate"]
    assert info["method"] == method and info["client"] == 1 and len(info["classnames"]) == 40
    assert cert["dp_mode"] == "off" and cert["epsilon"] is None and not cert["formal_guarantee"]
    assert cert["guarantee"].startswith("no formal guarantee") and cert["rounds"] == 2

    # client 1's local test images, rendered to a folder as PNG
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    bench = Benchmark(build_config(state["config"]))
    index, weight = bench.plan.local[1]
    split = bench.dataset.split("test")
    folder = tmp_path / "images"
    folder.mkdir()
    for k, i in enumerate(index.tolist()):
        split.load(i).save(folder / f"{k:04d}.png")
    assert main(["predict", "--prompt", str(out), str(folder), "--json", "--top-k", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(index) and all(len(r["top"]) == 2 for r in rows)
    names = bench.dataset.classnames
    predicted = np.array([names.index(r["top"][0]["class"]) for r in rows])
    truth = np.asarray(split.labels)[index.numpy()]
    accuracy = float((weight.numpy() * (predicted == truth)).sum())
    reported = json.loads((trained / "summary.json").read_text())["methods"][method]["per_client"]["local"][1]
    assert accuracy == pytest.approx(reported, abs=1e-5)
    assert info["provenance"]["local_accuracy"] == pytest.approx(reported)


def test_bad_exports_are_one_line_errors(trained, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    cases = [
        (["--method", "coop", "--client", "0"], ["no method 'coop'", "dpfpl"]),
        (["--method", "dpfpl", "--client", "9"], ["--client 9", "0 … 4"]),
    ]
    for extra, words in cases:
        assert main(["export", str(trained), *extra, "--out", str(out)]) == 2
        _one_line_error(capsys, *words)
    assert main(["export", str(tmp_path), "--method", "dpfpl", "--client", "0", "--out", str(out)]) == 2
    _one_line_error(capsys, "not a pfpl run folder")
    out.write_bytes(b"keep me")
    assert main(["export", str(trained), "--method", "dpfpl", "--client", "0", "--out", str(out)]) == 2
    _one_line_error(capsys, "exists", "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_tampered_damaged_or_mismatched_artifacts_are_refused(trained, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    assert main(["export", str(trained), "--method", "dpfpl", "--client", "0", "--out", str(good)]) == 0
    artifact = PromptArtifact.load(good)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(image)

    raw = bytearray(good.read_bytes())
    raw[-5] ^= 0x40  # one bit of the context tensor
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(raw))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 5)
    other = tmp_path / "other.safetensors"
    artifact.backbone_fingerprint = "0123456789abcdef"  # a prompt trained on other weights
    artifact.save(other)
    for path, words in [
        (tampered, ["modified after export"]),
        (damaged, ["not a safetensors file"]),
        (tmp_path / "missing.safetensors", ["does not exist"]),
        (other, ["fingerprint", "0123456789abcdef", "--pretrained"]),
    ]:
        assert main(["predict", "--prompt", str(path), str(image)]) == 2
        _one_line_error(capsys, *words)
    assert main(["predict", "--prompt", str(good), str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "does not exist")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["predict", "--prompt", str(good), str(tmp_path / "bad.png")]) == 2
    _one_line_error(capsys, "cannot read image", "bad.png")
    assert main(["predict", "--prompt", str(good), str(image), "--top-k", "41"]) == 2
    _one_line_error(capsys, "--top-k 41")


def test_a_private_runs_certificate_carries_its_accountants_epsilon(tmp_path, capsys):
    run = tmp_path / "run"
    private = [*SMALL[:-4], "train.methods=['dpfpl']", "dp.mode='feature'", "dp.target_epsilon=2.0"]
    sets = [a for s in [*private, f"cache_dir='{tmp_path / 'cache'}'"] for a in ("--set", s)]
    assert main(["run", "-q", "--json", "--out", str(run), *sets]) == 0
    out = tmp_path / "p.safetensors"
    assert main(["export", str(run), "--method", "dpfpl", "--client", "2", "--out", str(out)]) == 0
    assert "ε = " in capsys.readouterr().out
    cert = PromptArtifact.load(out).certificate
    entry = json.loads((run / "summary.json").read_text())["methods"]["dpfpl"]
    assert cert["epsilon"] == entry["epsilon_per_client"][2] and 0 < cert["epsilon"] <= 2.0 + 1e-9
    assert cert["formal_guarantee"] and cert["dp_mode"] == "feature" and cert["delta"] == entry["privacy"]["delta"]
    assert cert["noise_multiplier"] == entry["privacy"]["noise_multiplier"] > 0 and cert["audit"] is None
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sample-level DP" in text and "not audited" in text
