import json

from pfpl.cli import main


def test_zeroshot_json_schema(capsys, tmp_path):
    code = main(["zeroshot", "--json", "--set", f"cache_dir='{tmp_path}'", "--set", "data.test_per_class_domain=1"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"accuracy", "per_domain"}
    assert set(out["per_domain"]) == {"photo", "sketch", "painting", "clipart", "night"}
    assert 0 <= out["accuracy"] <= 1


def test_invalid_override_is_one_line_and_exit_2(capsys):
    assert main(["zeroshot", "--set", "backbone.device=tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "backbone.device" in err and "'tpu'" in err


def test_download_tag_is_one_line_and_exit_2(capsys, no_network, tmp_path):
    assert main(["zeroshot", "--set", "backbone.name=RN50", "--set", "backbone.pretrained=openai",
                 "--set", f"cache_dir='{tmp_path}'"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "local checkpoint" in err
