import pytest

from pfpl.config import ConfigError, load_config


def test_defaults_are_the_embedded_benchmark():
    cfg = load_config()
    assert cfg.backbone.name == "embedded" and cfg.data.dataset == "shapes" and cfg.prompt.n_ctx == 16


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 4\n[backbone]\nname = "ViT-B-16"\n[prompt]\nn_ctx = 8\n')
    cfg = load_config(path, ["prompt.n_ctx=4", "train.rank=2", "backbone.pretrained=/tmp/x.bin", "prompt.init_std=0.5"])
    assert cfg.seed == 4 and cfg.backbone.name == "ViT-B-16" and cfg.prompt.n_ctx == 4
    assert cfg.backbone.pretrained == "/tmp/x.bin" and cfg.prompt.init_std == 0.5


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.seed=abc", ["data.seed", "'abc'", "integer"]),
        ("backbone.device=tpu", ["backbone.device", "'tpu'", "'auto', 'cpu' or 'cuda'"]),
        ("prompt.n_ctx=0", ["prompt.n_ctx", "0", "greater than or equal to 1"]),
        ("data.colour=1", ["data.colour", "not a known key", "train_per_class_domain"]),
        ("nonsense=1", ["nonsense", "not a known key", "backbone"]),
        ("seed", ["seed", "key=value"]),
        ("dp.clip_quantile=0", ["dp.clip_quantile", "0", "greater than 0"]),
        ("dp.clip_quantile=1.5", ["dp.clip_quantile", "1.5", "less than or equal to 1"]),
        ("dp.lr=-0.1", ["dp.lr", "-0.1", "greater than 0"]),
        ("dp.momentum=1", ["dp.momentum", "1", "less than 1"]),
        ("prompt.init=3", ["prompt.init", "3", "string"]),
    ],
)
def test_invalid_values_give_one_line_naming_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_embedded_toml_spells_out_the_defaults():
    """configs/embedded.toml claims to be the main job's defaults; it must not drift from them."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "embedded.toml"
    assert load_config(path, []).model_dump() == load_config(None, []).model_dump()


def test_values_valid_alone_but_not_together_are_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prompt.n_ctx=4", "train.rank=8"])
    assert "train.rank = 8" in str(err.value) and "prompt.n_ctx = 4" in str(err.value) and "\n" not in str(err.value)
