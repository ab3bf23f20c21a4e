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
    assert table["methods"]["coop"]["1"]["validation"]["local"] is not None  # chosen on val, never on test
    csv = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert csv[0].endswith(",val_local,val_neighbor") and len(csv) == 5
    assert table["randomness"] == "secret" and table["methods"]["dpfpl"]["1"]["formal_guarantee"] is True
    assert ",formal," in csv[0] and any(",accounted,yes," in line for line in csv)


def test_a_sweep_folder_trained_with_another_config_is_refused_before_training(tmp_path):
    cfg = load_config(None, TINY + [f"cache_dir='{tmp_path / 'c'}'"])
    run_sweep(cfg, [1.0], tmp_path / "sweep")
    before = (tmp_path / "sweep" / "eps-1" / "summary.json").read_text()
    other = load_config(None, TINY + [f"cache_dir='{tmp_path / 'c'}'", "train.rank=2"])
    with pytest.raises(ConfigError, match=r"eps-1 was trained with another config \(train.rank = 8 there, 2 here\)"):
        run_sweep(other, [1.0, math.inf], tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "eps-inf").exists()
    assert (tmp_path / "sweep" / "eps-1" / "summary.json").read_text() == before
    # an explicit dp.lr equal to the default for the target trains the same run: reused
    from pfpl.federation.wiring import private_sgd

    lr, _ = private_sgd(sweep_configs(cfg, [1.0])["1"])
    same = load_config(None, TINY + [f"cache_dir='{tmp_path / 'c2'}'", f"dp.lr={lr}"])
    assert run_sweep(same, [1.0], tmp_path / "sweep")["methods"] == run_sweep(cfg, [1.0], tmp_path / "sweep")["methods"]


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


def test_secfpp_clustering_on_raw_image_features_is_kept_out_of_private_runs():
    """SecFPP's default clustering reads raw mean image features, which no mechanism covers: a private
    run of it is refused with the way out named; clustering on (DP) prompts or no clustering runs; a
    sweep with the default methods leaves it out and says so, one with the methods listed refuses it."""
    from pfpl.federation.sweep import default_methods
    from pfpl.privacy.rules import validate_dp

    private = ["dp.mode=feature", "dp.target_epsilon=1.0"]
    for method in ("secfpp", "secfpp-plain"):
        cfg = load_config(None, [*private, f"train.methods=['{method}']"])
        with pytest.raises(PrivacyConfigError, match="cluster_on='prompts'"):
            validate_dp(cfg.dp, cfg.train.methods, cfg.federation, cfg.secfpp.cluster_on)
    ok = load_config(None, [*private, "train.methods=['secfpp']", "secfpp.cluster_on='prompts'"])
    validate_dp(ok.dp, ok.train.methods, ok.federation, ok.secfpp.cluster_on)
    ok = load_config(None, [*private, "train.methods=['secfpp-global']"])
    validate_dp(ok.dp, ok.train.methods, ok.federation, ok.secfpp.cluster_on)

    defaults, skipped = default_methods(load_config(None, []))
    assert skipped == ["secfpp"] and "secfpp" not in defaults.train.methods and "dpfpl" in defaults.train.methods
    sweep_configs(defaults, [1.0, math.inf])
    # a private run with the default methods leaves it out and says so; a non-private one keeps it
    run_cfg = load_config(None, private)
    assert "secfpp" not in run_cfg.train.methods and "secfpp" in run_cfg.notes[0]
    validate_dp(run_cfg.dp, run_cfg.train.methods, run_cfg.federation, run_cfg.secfpp.cluster_on)
    assert "secfpp" in load_config(None, []).train.methods and not load_config(None, []).notes
    listed = load_config(None, ["train.methods=['dpfpl', 'secfpp']"])
    assert default_methods(listed) == (listed, [])
    with pytest.raises(PrivacyConfigError, match="secfpp"):
        sweep_configs(listed, [1.0])


def test_a_base_to_novel_sweep_reports_base_novel_hm_in_its_table_and_csv(tmp_path):
    cfg = load_config(None, TINY + [f"cache_dir='{tmp_path / 'c'}'", "evaluation.novel_fraction=0.5"])
    table = run_sweep(cfg, [math.inf], tmp_path / "sweep")
    for m in ("coop", "dpfpl"):
        assert all(0 <= table["methods"][m]["inf"][k] <= 1 for k in ("base", "novel", "hm"))
    csv = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert header[5:10] == ["local", "neighbor", "base", "novel", "hm"] and (tmp_path / "sweep" / "sweep.png").is_file()
    row = dict(zip(header, csv[1].split(",")))
    assert float(row["hm"]) == pytest.approx(table["methods"][row["method"]]["inf"]["hm"], abs=1e-4)
