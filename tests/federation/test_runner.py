import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfpl.config import load_config
from pfpl.federation.runner import run

SMALL = [
    "federation.n_clients=4",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
]


def _overrides(tmp_path: Path, extra: list[str]) -> list[str]:
    return SMALL + [f"cache_dir='{tmp_path / 'cache'}'", f"output_dir='{tmp_path / 'runs'}'"] + extra


def test_run_writes_the_whole_run_folder(tmp_path):
    cfg = load_config(None, _overrides(tmp_path, ["train.methods=['coop', 'dpfpl']"]))
    summary = run(cfg, tmp_path / "run")
    folder = tmp_path / "run"
    for name in (
        "config.json",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "summary.csv",
        "accuracy.png",
        "checkpoint.pt",
        "prompts-coop.pt",
        "prompts-dpfpl.pt",
    ):
        assert (folder / name).is_file(), name
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [("coop", 1), ("coop", 2), ("dpfpl", 1), ("dpfpl", 2)]
    clients = json.loads((folder / "partition.json").read_text())["clients"]
    assert len(clients) == 4 and sum(c["n"] for c in clients) == 200
    assert all(len(c["classes"]) == 10 for c in clients)
    assert set(summary["methods"]) == {"coop", "dpfpl"}
    for m in list(summary["methods"].values()) + [summary["zero_shot"]]:
        assert 0 <= m["local"] <= 1 and 0 <= m["neighbor"] <= 1
    assert (
        json.loads((folder / "summary.json").read_text())["methods"]["coop"]["local"]
        == summary["methods"]["coop"]["local"]
    )
    assert (folder / "summary.csv").read_text().splitlines()[0] == "method,local,local_std,neighbor,neighbor_std"


def _pfpl(*args: str) -> list[str]:
    return [sys.executable, "-m", "pfpl.cli", *args]


# a `pfpl` whose OS entropy is fixed: two processes draw the same secrets in the same order (tests only)
FIXED_ENTROPY = (
    "import hashlib, itertools, sys; import pfpl.streams as s; c = itertools.count(); "
    "s.entropy = lambda n: hashlib.sha256(b'pfpl-test-%d' % next(c)).digest()[:n]; "
    "from pfpl.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("randomness", ["seeded", "secret"])
def test_resume_after_a_real_kill_ends_with_the_same_metrics(tmp_path, randomness):
    """SIGKILL mid-run, then --resume: the same final metrics as the run that was never killed — for a
    private run with seeded noise (the streams of every non-private run too), and one with secret noise
    (whose secrets are in
    the checkpoint: the killed and the whole run draw the same secrets from a fixed entropy source,
    and the resumed process, with real entropy, continues the killed one's streams from its checkpoint)."""
    private = ["dp.mode=feature", "dp.noise_multiplier=2.0", f"dp.randomness={randomness}"]
    extra = ["train.methods=['fedotp-lite', 'dpfpl']", "federation.rounds=3", *private]
    sets = [a for o in _overrides(tmp_path, extra) for a in ("--set", o)]
    start = [sys.executable, "-c", FIXED_ENTROPY] if randomness == "secret" else [sys.executable, "-m", "pfpl.cli"]
    whole = subprocess.run(
        [*start, "run", "--json", "-q", "--out", str(tmp_path / "whole"), *sets],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*start, "run", "-q", "--out", str(killed_dir), *sets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill inside the last method, after at least one of its rounds
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 4 <= done < 6, f"killed after {done} of 6 rounds"
    assert not (killed_dir / "summary.json").exists()

    resumed = subprocess.run(
        _pfpl("run", "--json", "-q", "--resume", str(killed_dir)), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["methods"] == expected["methods"]
    assert got["zero_shot"] == expected["zero_shot"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 6


def test_resume_refuses_bad_folders_and_mixed_flags(tmp_path, capsys):
    from pfpl.cli import main

    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "seed=1"]) == 2
    assert "drop --config/--set" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, words",
    [
        ("federation.partition=random", ["federation.partition", "'random'", "pathological"]),
        ("train.methods=['coop', 'fedavg2']", ["train.methods", "fedavg2"]),
        ("federation.n_clients=0", ["federation.n_clients", "greater than or equal to 1"]),
    ],
)
def test_bad_run_config_is_one_line_before_any_work(bad, words, capsys, tmp_path):
    from pfpl.cli import main

    assert main(["run", "--set", bad, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words)
    assert not (tmp_path / "r").exists()
