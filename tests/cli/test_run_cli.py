"""``pfpl run`` as a newcomer meets it: run folders are never silently mixed, failed starts leave
nothing behind, and asking for DP without noise is refused."""

from __future__ import annotations

import json

import pytest

from pfpl.cli import main

SMALL = [
    "federation.n_clients=4",
    "federation.rounds=1",
    "federation.local_steps=1",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "train.methods=['coop']",
]


def _args(tmp_path, extra=()):
    out = []
    for s in [*SMALL, f"cache_dir='{tmp_path / 'cache'}'", *extra]:
        out += ["--set", s]
    return out


def test_a_finished_run_folder_is_not_overwritten_unless_asked(tmp_path, capsys):
    folder = tmp_path / "run"
    assert main(["run", "--json", "-q", "--out", str(folder), *_args(tmp_path, ["train.methods=['dpfpl']"])]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["run", "--json", "-q", "--out", str(folder), *_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not empty" in err and "--overwrite" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched
    assert main(["run", "--json", "-q", "--out", str(folder), "--overwrite", *_args(tmp_path)]) == 0
    names = {p.name for p in folder.iterdir()}
    assert "prompts-coop.pt" in names and "prompts-dpfpl.pt" not in names  # the old run is gone, not mixed in
    assert json.loads((folder / "summary.json").read_text())["methods"].keys() == {"coop"}


@pytest.mark.parametrize(
    "bad, words",
    [
        (["federation.n_clients=100", "federation.partition='pathological'"], ["n_clients"]),
        (["backbone.name='ViT-Nope-1'"], ["ViT-Nope-1"]),
        (["dp.mode='feature'"], ["no noise", "dp.target_epsilon"]),
        (["prompt.template='nobraces'"], ["prompt.template", "{}"]),
    ],
)
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, bad, words):
    folder = tmp_path / "run"
    assert main(["run", "-q", "--out", str(folder), *_args(tmp_path, bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert not folder.exists()


def test_the_audit_hint_for_an_unfinished_run_is_true(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["audit", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--resume" not in err
