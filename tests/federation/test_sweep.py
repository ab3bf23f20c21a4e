import json
import math

import pytest

from pfpl.cli.sweep import parse_epsilons
from pfpl.config import ConfigError, load_config
from pfpl.federation.sweep import run_sweep, sweep_configs
from pfpl.privacy.accounting import PrivacyConfigError

TINY = [
    "federation.n_clients=4",
    "federation.rounds=1",
    "federation.local_steps=1",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "train.methods=['coop', 'dpfpl']",
]


def test_sweep_writes_table_and_plot_and_meets_each_target(tmp_path):
    cfg = load_config(None, TINY + [f"cache_dir='{tmp_path / 'c'}'"])
    table = run_sweep(cfg, [1.0, math.inf], tmp_path / "sweep")
    assert table["epsilons"] == ["1", "inf"]
    assert table["methods"]["dpfpl"]["inf"]["epsilon"] is None
    assert 0.9 < table["methods"]["dpfpl"]["1"]["epsilon"] <= 1.0 + 1e-6
    for name in ("sweep.json", "sweep.csv", "sweep.png", "eps-1/summary.json", "eps-inf/summary.json"):
        assert (tmp_path / "sweep" / name).is_file()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["methods"].keys() == {"coop", "dpfpl"}
    again = run_sweep(cfg, [1.0, math.inf], tmp_path / "sweep")  # finished runs are reused, not retrained
    assert again["methods"] == table["methods"]


def test_bad_epsilons_and_combinations_fail_before_training():
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_epsilons("1,0")
    with pytest.raises(ConfigError, match="not a number"):
        parse_epsilons("1,x")
    assert parse_epsilons("0.5, inf") == [0.5, math.inf]
    cfg = load_config(None, ["dp.mode=reference", "train.methods=['coop']"])
    with pytest.raises(PrivacyConfigError, match="coop"):
        sweep_configs(cfg, [1.0])
    with pytest.raises(ConfigError):
        load_config(None, ["dp.delta=2"])
