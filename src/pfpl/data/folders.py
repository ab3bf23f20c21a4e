"""Real image datasets from the layouts users already have on disk (nothing is downloaded).

* **CoOp/Dassl** (the prompt-learning benchmarks): ``ROOT/<folder>/<image dir>/…`` plus the split file
  ``split_zhou_<Name>.json`` — ``{"train" | "val" | "test": [[path under the image dir, label,
  class name], …]}``; the class names are the split file's own (CoOp's cleaned names). FGVC-Aircraft
  reads ``images_variant_{train,val,test}.txt`` and ImageNet ``classnames.txt`` with
  ``images/{train,val}/<wnid>/`` (its val serves as test, a seeded share of train as val), as CoOp does.
* **torchvision's on-disk CIFAR-10 / CIFAR-100** (``cifar-10-batches-py/``, ``cifar-100-python/``):
  read with an unpickler that only builds numpy arrays and plain containers (a pickle that asks for
  anything else is refused).
* **one folder per domain** (DomainNet, Office-Home, PACS): ``ROOT/<folder>/<domain>/<class>/*.jpg``;
  DomainNet's ``<domain>_train.txt`` / ``<domain>_test.txt`` are used when present.

Splits a layout does not define are drawn per class (and domain) with ``data.seed``
(``data.val_fraction``, ``data.test_fraction``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pfpl.data.base import SPLITS, SplitData, UnreadableImage, VisionDataset
from pfpl.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class CoOpLayout:
    folder: str
    images: str
    split_file: str


# name -> (folder under data.root, image folder, split file): CoOp's DATASETS.md layout
COOP = {
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json"),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "stanford_cars": CoOpLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": CoOpLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
# name -> (folder, domains) for one-folder-per-domain datasets
DOMAINS = {
    "domainnet": ("domainnet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
    "office_home": ("office_home", ("Art", "Clipart", "Product", "Real_World")),
    "pacs": ("pacs", ("art_painting", "cartoon", "photo", "sketch")),
}
CIFAR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class Listing:
    """Every split's images: (path, label, domain) rows."""

    classnames: list[str]
    domainnames: list[str]
    splits: dict[str, list[tuple[Path, int, int]]]


class FolderDataset(VisionDataset):
    """Images listed per split; each is read (and checked) when the features are extracted."""

    parallel_load = True

    def __init__(self, name: str, listing: Listing, root: Path, workers: int = 0, max_unreadable: float = 0.0):
        self.name = name
        self.classnames = listing.classnames
        self.domainnames = listing.domainnames
        self.root = root
        self.workers = workers
        self.max_unreadable = max_unreadable
        self._splits = listing.splits
        for split, rows in self._splits.items():
            if not rows:
                raise DatasetError(f"{name} under {root}: the {split} split is empty")

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}/{self.classnames}/{self.domainnames}".encode())
        for split in SPLITS:
            for path, label, domain in self._splits[split]:
                st = path.stat()
                h.update(
                    f"{split}:{path.relative_to(self.root)}:{label}:{domain}:{st.st_size}:{st.st_mtime_ns}".encode()
                )
        return h.hexdigest()[:16]

    def split(self, name: str) -> SplitData:
        self._check_split(name)
        rows = self._splits[name]
        paths = [p for p, _, _ in rows]
        return SplitData(
            labels=np.array([y for _, y, _ in rows], dtype=np.int64),
            domains=np.array([d for _, _, d in rows], dtype=np.int64),
            load=_Loader(paths),
        )


class _Loader:
    """``load(i)``: image i as RGB (a picklable callable, for DataLoader workers)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from None


class ArrayDataset(VisionDataset):
    """Images held as a uint8 array ``[N, H, W, 3]`` (CIFAR)."""

    def __init__(self, name: str, classnames: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]], key: str):
        self.name, self.classnames, self.domainnames = name, classnames, [name]
        self._splits, self._key = splits, key

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._key.encode()).hexdigest()[:16]

    def split(self, name: str) -> SplitData:
        self._check_split(name)
        images, labels = self._splits[name]
        return SplitData(labels, np.zeros(len(labels), np.int64), lambda i: Image.fromarray(images[i], "RGB"))


# ---- layouts -----------------------------------------------------------------------------------
def _need(path: Path, what: str, shape: str) -> Path:
    if not path.exists():
        raise DatasetError(f"expected {what} at {path} — {shape}")
    return path


def _coop_shape(layout: CoOpLayout) -> str:
    images = f"{layout.folder}/{layout.images}/…" if layout.images else f"{layout.folder}/<images>"
    return f"the CoOp/Dassl layout is data.root/{images} and data.root/{layout.folder}/{layout.split_file}"


def read_coop(root: Path, layout: CoOpLayout) -> Listing:
    base = _need(root / layout.folder, "the dataset folder", _coop_shape(layout))
    split_path = _need(base / layout.split_file, "the split file", _coop_shape(layout))
    images = base / layout.images if layout.images else base
    try:
        raw = json.loads(split_path.read_text())
    except (ValueError, OSError) as exc:
        raise DatasetError(f"split file {split_path} is not readable JSON ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s), list) for s in SPLITS):
        raise DatasetError(f"split file {split_path} must hold lists 'train', 'val' and 'test' of [path, label, name]")
    names: dict[int, str] = {}
    splits: dict[str, list[tuple[Path, int, int]]] = {}
    missing: list[str] = []
    for split in SPLITS:
        rows = []
        for item in raw[split]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int)):
                raise DatasetError(f"split file {split_path}: {split} entry {item!r} is not [path, label, class name]")
            path, label, name = images / item[0], item[1], str(item[2])
            if names.setdefault(label, name) != name:
                raise DatasetError(
                    f"split file {split_path}: label {label} is named both {names[label]!r} and {name!r}"
                )
            if not path.is_file():
                missing.append(item[0])
            rows.append((path, label, 0))
        splits[split] = rows
    if missing:
        raise DatasetError(
            f"split file {split_path} names {len(missing)} image(s) missing under {images}, e.g. {missing[0]}"
        )
    return Listing(_dense_names(names, split_path), [layout.folder], splits)


def _dense_names(names: dict[int, str], source: Path) -> list[str]:
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{source}: labels must be 0 … C−1 with no gaps, got {sorted(names)[:10]}…")
    return [clean_name(names[i]) for i in range(len(names))]


def clean_name(name: str) -> str:
    """CoOp's generic clean-up: underscores to spaces (the split files already hold cleaned names)."""
    return " ".join(name.replace("_", " ").split())


def read_aircraft(root: Path) -> Listing:
    shape = "data.root/fgvc_aircraft/images/*.jpg with images_variant_{train,val,test}.txt (lines '<id> <variant>')"
    base = _need(root / "fgvc_aircraft", "the dataset folder", shape)
    listed = {  # split -> (image id, variant) pairs
        split: [line.strip().partition(" ")[::2] for line in lines if line.strip()]
        for split in SPLITS
        for lines in [_need(base / f"images_variant_{split}.txt", "a split list", shape).read_text().splitlines()]
    }
    names = sorted({variant for pairs in listed.values() for _, variant in pairs})
    index = {n: i for i, n in enumerate(names)}
    splits = {s: [(base / "images" / f"{i}.jpg", index[v], 0) for i, v in pairs] for s, pairs in listed.items()}
    _check_files(splits, base / "images")
    return Listing(names, ["fgvc_aircraft"], splits)


def read_imagenet(root: Path, seed: int, val_fraction: float) -> Listing:
    shape = "data.root/imagenet/classnames.txt (lines '<wnid> <class name>') and images/{train,val}/<wnid>/*"
    base = _need(root / "imagenet", "the dataset folder", shape)
    wnids, names = [], []
    for line in _need(base / "classnames.txt", "the class list", shape).read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(name.strip())
    train = _class_folders(_need(base / "images" / "train", "the train images", shape), wnids)
    test = _class_folders(_need(base / "images" / "val", "the val images (used as test)", shape), wnids)
    train, val = _hold_out(train, val_fraction, seed)
    return Listing(names, ["imagenet"], {"train": train, "val": val, "test": test})


def read_domains(root: Path, folder: str, domains: tuple[str, ...], seed: int, val: float, test: float) -> Listing:
    shape = f"data.root/{folder}/<domain>/<class>/*.jpg for domains {', '.join(domains)}"
    base = _need(root / folder, "the dataset folder", shape)
    present = [d for d in domains if (base / d).is_dir()]
    if not present:
        raise DatasetError(f"no domain folder under {base} — {shape}")
    classes = sorted({c.name for d in present for c in (base / d).iterdir() if c.is_dir()})
    splits: dict[str, list[tuple[Path, int, int]]] = {s: [] for s in SPLITS}
    for k, domain in enumerate(present):
        listed = [base / f"{domain}_{s}.txt" for s in ("train", "test")]
        rows = _class_folders(base / domain, classes, domain=k)
        if all(p.is_file() for p in listed):  # DomainNet's own split lists: '<domain>/<class>/<file> <label>'
            by_path = {p.relative_to(base).as_posix(): (p, y, d) for p, y, d in rows}
            own = [[x.split()[0] for x in p.read_text().splitlines() if x.split()] for p in listed]
            missing = [x for names in own for x in names if x not in by_path]
            if missing:
                raise DatasetError(
                    f"{listed[0].name} / {listed[1].name} name {len(missing)} image(s) missing under {base}, "
                    f"e.g. {missing[0]}"
                )
            own = [[by_path[x] for x in names] for names in own]
            tr, va = _hold_out(own[0], val, seed + k)
            te = own[1]
        else:
            tr, va, te = _three_way(rows, val, test, seed + k)
        for s, part in zip(SPLITS, (tr, va, te)):
            splits[s] += part
    return Listing([clean_name(c) for c in classes], present, splits)


def read_cifar(root: Path, name: str, seed: int, val_fraction: float) -> ArrayDataset:
    folder = CIFAR[name]
    hundred = name == "cifar100"
    files = (
        {"train": ["train"], "test": ["test"]}
        if hundred
        else {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    )
    meta_file = "meta" if hundred else "batches.meta"
    listed = ", ".join(files["train"] + files["test"] + [meta_file])
    shape = f"torchvision's on-disk layout: data.root/{folder}/{{{listed}}}"
    base = _need(root / folder, "the dataset folder", shape)
    meta = _unpickle(_need(base / meta_file, "the class list", shape))
    raw_names = meta["fine_label_names" if hundred else "label_names"]
    names = [clean_name(n.decode() if isinstance(n, bytes) else str(n)) for n in raw_names]
    key = hashlib.sha256(f"{name}".encode())
    arrays = {}
    for split, parts in files.items():
        images, labels = [], []
        for part in parts:
            path = _need(base / part, "a batch file", shape)
            batch = _unpickle(path)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DatasetError(f"{path}: 'data' must be N × 3072 uint8 rows, got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch["fine_labels" if hundred else "labels"], dtype=np.int64))
            st = path.stat()
            key.update(f"{part}:{st.st_size}:{st.st_mtime_ns}".encode())
        arrays[split] = (np.concatenate(images), np.concatenate(labels))
    images, labels = arrays["train"]
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.choice(idx, int(round(val_fraction * len(idx))), replace=False)] = True
    splits = {"train": (images[~val], labels[~val]), "val": (images[val], labels[val]), "test": arrays["test"]}
    key.update(f"{seed}:{val_fraction}".encode())
    return ArrayDataset(name, names, splits, key.hexdigest())


class _NumpyOnly(pickle.Unpickler):
    """Builds plain containers and numpy arrays only: a batch file asking for anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a CIFAR python batch file ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a CIFAR python batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


# ---- helpers -----------------------------------------------------------------------------------
def _class_folders(base: Path, classes: list[str], domain: int = 0) -> list[tuple[Path, int, int]]:
    rows = []
    for y, c in enumerate(classes):
        folder = base / c
        if folder.is_dir():
            rows += [(p, y, domain) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DatasetError(f"no images under {base}/<class>/ (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return rows


def _check_files(splits: dict[str, list[tuple[Path, int, int]]], where: Path) -> None:
    missing = [p for rows in splits.values() for p, _, _ in rows if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed image(s) missing under {where}, e.g. {missing[0].name}")


def _per_class(rows: list[tuple[Path, int, int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, (_, y, _) in enumerate(rows):
        groups.setdefault(y, []).append(i)
    return groups


def _hold_out(rows, fraction: float, seed: int):
    """(rest, held out): ``fraction`` of each class, seeded."""
    parts = _three_way(rows, fraction, 0.0, seed)
    return parts[0], parts[1]


def _three_way(rows, val: float, test: float, seed: int):
    rng = np.random.default_rng(seed)
    out: tuple[list, list, list] = ([], [], [])
    for _, idx in sorted(_per_class(rows).items()):
        idx = [idx[i] for i in rng.permutation(len(idx))]
        n_test = min(len(idx) - 1, int(np.ceil(test * len(idx))))  # every non-zero share gets an image
        n_val = min(len(idx) - 1 - n_test, int(np.ceil(val * len(idx))))
        for k, i in enumerate(idx):
            out[2 if k < n_test else 1 if k < n_test + n_val else 0].append(rows[i])
    return out


def builders() -> dict[str, Callable]:
    """name -> build(root, cfg) for every on-disk dataset."""
    out: dict[str, Callable] = {name: (lambda root, cfg, lay=lay: read_coop(root, lay)) for name, lay in COOP.items()}
    out["fgvc_aircraft"] = lambda root, cfg: read_aircraft(root)
    out["imagenet"] = lambda root, cfg: read_imagenet(root, cfg.seed, cfg.val_fraction)
    for name, (folder, domains) in DOMAINS.items():
        out[name] = lambda root, cfg, f=folder, d=domains: read_domains(
            root, f, d, cfg.seed, cfg.val_fraction, cfg.test_fraction
        )
    return out


def build_folder_dataset(cfg) -> VisionDataset:
    """The on-disk dataset ``cfg.dataset`` under ``cfg.root``."""
    if cfg.root is None:
        raise DatasetError(f"data.dataset = {cfg.dataset!r} reads images from disk: set data.root to its folder")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist or is not a folder")
    if cfg.dataset in CIFAR:
        return read_cifar(root, cfg.dataset, cfg.seed, cfg.val_fraction)
    listing = builders()[cfg.dataset](root, cfg)
    return FolderDataset(cfg.dataset, listing, root, cfg.workers, cfg.max_unreadable)
