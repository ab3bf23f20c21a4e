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
    assert (
        main(
            [
                "zeroshot",
                "--set",
                "backbone.name=RN50",
                "--set",
                "backbone.pretrained=openai",
                "--set",
                f"cache_dir='{tmp_path}'",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "local checkpoint" in err


def test_quality_update_manifest_rewrites_only_the_manifest(capsys, tmp_path):
    import shutil

    from pfpl.backbones.embedded import MANIFEST_FILE, WEIGHTS_FILE, assets_dir, load_manifest

    folder = tmp_path / "embedded"
    folder.mkdir()
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        shutil.copy(assets_dir() / name, folder / name)
    weights = (folder / WEIGHTS_FILE).read_bytes()
    sizes = ["data.train_per_class_domain=1", "data.val_per_class_domain=1", "data.test_per_class_domain=1"]
    args = [
        "quality",
        "--json",
        "--shots",
        "1",
        "--coop-epochs",
        "1",
        "--update-manifest",
        "--set",
        f"backbone.pretrained='{folder}'",
        "--set",
        f"cache_dir='{tmp_path / 'cache'}'",
    ]
    assert main(args + [x for s in sizes for x in ("--set", s)] + ["--set", "data.class_names=caption"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    manifest = load_manifest(folder)
    assert manifest["quality"] == printed and manifest["quality"]["test_images"] == 200
    assert manifest["quality"]["class_names"][0] == "red circle"
    assert manifest["pretraining"] == load_manifest()["pretraining"]
    assert (folder / WEIGHTS_FILE).read_bytes() == weights


def test_quality_update_manifest_refuses_other_backbones(capsys):
    assert main(["quality", "--update-manifest", "--set", "backbone.name=RN50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--update-manifest" in err and "RN50" in err
