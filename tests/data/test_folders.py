"""Real datasets from disk: tiny fake datasets in each layout users have (a few PIL images per class),
loaded, partitioned, encoded with the embedded model and trained for two rounds; and one clear error
for every kind of bad data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from pfpl.config import DATASET_NAMES, load_config
from pfpl.data import DATASETS, build_dataset
from pfpl.data.folders import CIFAR, COOP, DOMAINS
from pfpl.errors import DatasetError

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _image(path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), COLOURS[k % len(COLOURS)]).save(path)


def make_coop(root, name: str, classes=("red_circle", "blue star", "green ring"), per_split=(3, 1, 2)) -> None:
    """CoOp/Dassl: ROOT/<folder>/<images>/<class>/<file> and its split_zhou_*.json."""
    lay = COOP[name]
    images = root / lay.folder / lay.images
    split = {}
    for s, n in zip(("train", "val", "test"), per_split):
        rows = []
        for y, c in enumerate(classes):
            for i in range(n):
                rel = f"{c}/{s}_{i}.jpg"
                _image(images / rel, y)
                rows.append([rel, y, c])
        split[s] = rows
    (root / lay.folder / lay.split_file).write_text(json.dumps(split))


def make_domains(root, name: str, classes=("cat", "dog", "ice_cream"), per_class=5) -> None:
    folder, domains = DOMAINS[name]
    for d in domains[:2]:
        for y, c in enumerate(classes):
            for i in range(per_class):
                _image(root / folder / d / c / f"{i}.png", y)


def make_cifar(root, name: str, per_class=(4, 2), classes: int = 3) -> None:
    base = root / CIFAR[name]
    base.mkdir(parents=True)
    hundred = name == "cifar100"
    labels_key = b"fine_labels" if hundred else b"labels"
    names = [b"apple", b"aquarium_fish", b"bear", *[f"class_{i}".encode() for i in range(3, classes)]]
    meta = {b"fine_label_names" if hundred else b"label_names": names}
    files = (
        [("train", per_class[0]), ("test", per_class[1])]
        if hundred
        else [
            *[(f"data_batch_{i}", per_class[0]) for i in range(1, 6)],
            ("test_batch", per_class[1]),
        ]
    )
    rng = np.random.default_rng(0)
    for fname, n in files:
        labels = [y for y in range(len(names)) for _ in range(n)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        (base / fname).write_bytes(pickle.dumps({b"data": data, labels_key: labels}, protocol=2))
    (base / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))


def make_aircraft(root) -> None:
    base = root / "fgvc_aircraft"
    for s, n in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for y, variant in enumerate(["707-320", "A300B4", "Cessna 172"]):
            for i in range(n):
                image_id = f"{s}{y}{i:03d}"
                _image(base / "images" / f"{image_id}.jpg", y)
                lines.append(f"{image_id} {variant}")
        (base / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")


def make_imagenet(root) -> None:
    base = root / "imagenet"
    base.mkdir(parents=True)
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    (base / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in wnids.items()))
    for y, w in enumerate(wnids):
        for split, n in (("train", 5), ("val", 2)):
            for i in range(n):
                _image(base / "images" / split / w / f"{w}_{i}.JPEG", y)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [f"data.dataset={name!r}", f"data.root='{tmp_path}'", "data.workers=0", *extra]).data


def test_the_registry_and_the_config_know_the_same_datasets():
    assert set(DATASETS) == set(DATASET_NAMES)


@pytest.mark.parametrize("name", sorted(COOP))
def test_coop_layouts_load_with_the_split_files_names(tmp_path, name):
    make_coop(tmp_path, name)
    ds = build_dataset(_cfg(tmp_path, name))
    assert ds.classnames == ["red circle", "blue star", "green ring"]  # the split file's names, cleaned
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [9, 3, 6]
    test = ds.split("test")
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.load(0).mode == "RGB"
    assert ds.fingerprint == build_dataset(_cfg(tmp_path, name)).fingerprint


def test_aircraft_imagenet_and_cifar_layouts(tmp_path):
    make_aircraft(tmp_path)
    make_imagenet(tmp_path)
    make_cifar(tmp_path, "cifar10")
    make_cifar(tmp_path, "cifar100")
    air = build_dataset(_cfg(tmp_path, "fgvc_aircraft"))
    assert air.classnames == ["707-320", "A300B4", "Cessna 172"] and len(air.split("test")) == 6
    net = build_dataset(_cfg(tmp_path, "imagenet", "data.val_fraction=0.2"))
    assert net.classnames == ["tench", "goldfish", "great white shark"]
    assert [len(net.split(s)) for s in ("train", "val", "test")] == [12, 3, 6]  # val from train, test = val
    for name, n_train in (("cifar10", 5 * 4 * 3), ("cifar100", 4 * 3)):
        ds = build_dataset(_cfg(tmp_path, name, "data.val_fraction=0.25"))
        assert ds.classnames == ["apple", "aquarium fish", "bear"]
        assert len(ds.split("train")) + len(ds.split("val")) == n_train and len(ds.split("test")) == 6
        assert ds.split("test").load(0).size == (32, 32)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_one_folder_per_domain_gives_domain_labels(tmp_path, name):
    make_domains(tmp_path, name)
    ds = build_dataset(_cfg(tmp_path, name, "data.val_fraction=0.2", "data.test_fraction=0.2"))
    assert ds.classnames == ["cat", "dog", "ice cream"] and ds.domainnames == list(DOMAINS[name][1][:2])
    sizes = [len(ds.split(s)) for s in ("train", "val", "test")]
    assert sizes == [18, 6, 6] and set(ds.split("train").domains.tolist()) == {0, 1}


def test_domainnets_own_split_lists_are_used(tmp_path):
    make_domains(tmp_path, "domainnet")
    base = tmp_path / "domainnet"
    for d in ("clipart", "infograph"):
        files = sorted((base / d).rglob("*.png"))
        rel = [f.relative_to(base).as_posix() for f in files]
        (base / f"{d}_train.txt").write_text("".join(f"{r} 0\n" for r in rel[:10]))
        (base / f"{d}_test.txt").write_text("".join(f"{r} 0\n" for r in rel[10:]))
    ds = build_dataset(_cfg(tmp_path, "domainnet", "data.val_fraction=0.2"))
    assert len(ds.split("test")) == 10 and len(ds.split("train")) + len(ds.split("val")) == 20
    with open(base / "clipart_test.txt", "a") as f:
        f.write("clipart/cat/gone.png 0\n")
    with pytest.raises(DatasetError, match="name 1 image\\(s\\) missing.*clipart/cat/gone.png"):
        build_dataset(_cfg(tmp_path, "domainnet"))


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_data_gets_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="set data.root") as e:
        build_dataset(load_config(None, ["data.dataset='dtd'"]).data)
    with pytest.raises(DatasetError, match="does not exist") as e:
        build_dataset(_cfg(tmp_path / "nowhere", "dtd"))
    with pytest.raises(DatasetError) as e:
        build_dataset(_cfg(tmp_path, "dtd"))  # an empty root: the layout's folder is missing
    assert all(w in _one_line(e) for w in ("dtd", "CoOp/Dassl layout", "split_zhou_DescribableTextures.json"))
    make_coop(tmp_path, "dtd")
    (tmp_path / "dtd" / "images" / "blue star" / "test_1.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset(_cfg(tmp_path, "dtd"))
    assert all(w in _one_line(e) for w in ("names 1 image(s) missing", "blue star/test_1.jpg"))
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not readable JSON"):
        build_dataset(_cfg(tmp_path, "dtd"))
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load .*print"):
        build_dataset(_cfg(tmp_path, "cifar10"))


def test_unreadable_images_are_skipped_and_counted_or_fatal_past_the_threshold(tmp_path, tiny, caplog):
    from pfpl.data.features import encode_split

    make_coop(tmp_path, "eurosat")
    (tmp_path / "eurosat" / "2750" / "green ring" / "test_0.jpg").write_bytes(b"not a jpeg")
    strict = build_dataset(_cfg(tmp_path, "eurosat"))
    with pytest.raises(DatasetError) as e:
        encode_split(tiny, strict, "test")
    assert all(w in _one_line(e) for w in ("1 of 6 test images", "data.max_unreadable", "test_0.jpg"))
    lenient = build_dataset(_cfg(tmp_path, "eurosat", "data.max_unreadable=0.2"))
    feats = encode_split(tiny, lenient, "test")
    assert len(feats) == 5 and feats.labels.tolist() == [0, 0, 1, 1, 2]
    assert "skipped 1 unreadable test image" in caplog.text


def test_workers_extract_the_same_features(tmp_path, tiny):
    from pfpl.data.features import encode_split

    make_coop(tmp_path, "food101")
    one = encode_split(tiny, build_dataset(_cfg(tmp_path, "food101")), "train")
    two = encode_split(tiny, build_dataset(_cfg(tmp_path, "food101", "data.workers=2")), "train", batch_size=4)
    assert np.allclose(one.features.numpy(), two.features.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "name, make, extra",
    [
        ("caltech101", make_coop, ["federation.partition='pathological'", "federation.n_clients=3"]),
        ("office_home", make_domains, ["federation.partition='domain'", "federation.n_clients=2"]),
    ],
)
def test_two_rounds_train_on_a_folder(tmp_path, name, make, extra):
    from pfpl.cli import main

    make(tmp_path / "data", name)
    sets = [
        f"data.dataset={name!r}",
        f"data.root='{tmp_path / 'data'}'",
        "data.workers=0",
        "federation.rounds=2",
        "federation.local_steps=1",
        "federation.batch_size=4",
        "prompt.n_ctx=4",
        "train.rank=2",
        "train.methods=['dpfpl', 'promptfl']",
        f"cache_dir='{tmp_path / 'cache'}'",
        *extra,
    ]
    out = tmp_path / "run"
    assert main(["run", "-q", "--json", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"dpfpl", "promptfl"}
    assert all(0 <= m["local"] <= 1 for m in summary["methods"].values())


RECIPES = sorted((__import__("pathlib").Path(__file__).parents[2] / "configs" / "paper").glob("*.toml"))


def test_every_paper_recipe_validates_with_its_epsilon_grid():
    import open_clip

    from pfpl.federation.sweep import sweep_configs

    assert len(RECIPES) == 6
    for path in RECIPES:
        cfg = load_config(path, ["data.root='/data'"])
        assert cfg.backbone.name in open_clip.list_models() and cfg.data.dataset in DATASETS
        rounds = 200 if cfg.data.dataset == "cifar100" else 100  # the paper's
        assert cfg.dp.mode == "per-sample" and cfg.dp.clip == 10.0 and cfg.federation.rounds == rounds
        assert cfg.evaluation.report == "mean-last-10"  # the paper's metric
        grid = [0.4, 0.2, 0.1, 0.05, 0.01, float("inf")]
        assert set(sweep_configs(cfg, grid)) == {"0.4", "0.2", "0.1", "0.05", "0.01", "inf"}


BASELINE_RECIPES = sorted((RECIPES[0].parent / "baselines").glob("*.toml"))


@pytest.mark.parametrize("recipe", BASELINE_RECIPES, ids=lambda p: p.stem)
def test_each_baseline_recipe_validates_and_runs_the_method_it_reproduces(recipe):
    """configs/paper/baselines/: the setups of the peers' published tables (docs/paper-recipes.md)."""
    import open_clip

    cfg = load_config(recipe, ["data.root='/data'"])
    assert cfg.backbone.name in open_clip.list_models() and cfg.data.dataset in DATASETS
    paper = recipe.stem.split("-")[0]
    reproduced = {"feddnc": "fedotp", "pfedmma": "pfedmoap"}.get(paper, paper)
    assert reproduced in cfg.train.methods


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_paper_recipe_runs_two_rounds_on_a_fake_dataset_with_its_architecture(tmp_path, recipe):
    """The recipe as written (random weights of its architecture: none are downloaded), on a fake
    dataset of its layout, shortened to two rounds of one step and DP-FPL alone."""
    from pfpl.cli import main

    cfg = load_config(recipe, ["data.root='/data'"])
    data = tmp_path / "data"
    if cfg.data.dataset == "cifar100":
        make_cifar(data, "cifar100", per_class=(40, 2), classes=10)  # 10 of CIFAR-100's classes
    else:
        make_coop(data, cfg.data.dataset, classes=[f"class_{i}" for i in range(10)], per_split=(2, 1, 1))
    sets = [
        f"data.root='{data}'",
        "data.workers=0",
        "federation.rounds=2",
        "federation.local_steps=1",
        "federation.batch_size=2",
        "train.methods=['dpfpl']",
        "dp.target_epsilon=1.0",
        f"cache_dir='{tmp_path / 'cache'}'",
    ]
    out = tmp_path / "run"
    args = ["run", "-q", "--json", "--config", str(recipe), "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setup"]["backbone"] == f"{cfg.backbone.name}:random"  # the named architecture, random weights
    assert summary["methods"]["dpfpl"]["epsilon"] <= 1.0 + 1e-9
