import logging
from pathlib import Path

import pytest
import torch

from pfpl.data.base import DatasetError
from pfpl.data.features import cache_key, image_features
from pfpl.data.shapes_dataset import ShapesDataset


class CountingEncoder:
    """A stand-in image tower: colour statistics of the image, counting its calls."""

    def __init__(self, fingerprint: str = "enc-a"):
        import open_clip

        self.fingerprint = fingerprint
        self.preprocess = open_clip.image_transform(32, is_train=False)
        self.preprocess_id = repr(self.preprocess)
        self.calls = 0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


@pytest.fixture
def dataset():
    return ShapesDataset(seed=3, per_class_domain={"train": 1, "val": 1, "test": 1}, image_size=32)


def _cache_file(tmp_path: Path) -> Path:
    files = list((tmp_path / "features").glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def test_features_are_computed_once_then_read_from_cache(tmp_path, dataset):
    enc = CountingEncoder()
    first = image_features(enc, dataset, "test", tmp_path)
    calls = enc.calls
    again = image_features(enc, dataset, "test", tmp_path)
    assert enc.calls == calls
    assert torch.equal(first.features, again.features) and torch.equal(first.labels, again.labels)
    assert len(first) == 200 and first.features.shape == (200, 6)


def test_changed_backbone_or_dataset_never_reuses_stale_features(tmp_path, dataset):
    image_features(CountingEncoder("enc-a"), dataset, "test", tmp_path)
    other = CountingEncoder("enc-b")
    image_features(other, dataset, "test", tmp_path)
    assert other.calls > 0
    reseeded = ShapesDataset(seed=4, per_class_domain={"train": 1, "val": 1, "test": 1}, image_size=32)
    enc = CountingEncoder("enc-a")
    feats = image_features(enc, reseeded, "test", tmp_path)
    assert enc.calls > 0
    assert not torch.equal(feats.features, image_features(CountingEncoder("enc-a"), dataset, "test", tmp_path).features)
    assert cache_key(enc, dataset, "test") != cache_key(enc, dataset, "train")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte", "empty"])
def test_corrupt_cache_is_rebuilt_not_crashed_on(tmp_path, dataset, damage, caplog):
    enc = CountingEncoder()
    good = image_features(enc, dataset, "val", tmp_path)
    path = _cache_file(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 100)
    elif damage == "flip_byte":
        path.write_bytes(raw[:-7] + bytes([raw[-7] ^ 0x55]) + raw[-6:])
    else:
        path.write_bytes(b"")
    enc2 = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        rebuilt = image_features(enc2, dataset, "val", tmp_path)
    assert enc2.calls > 0, "damaged cache was trusted"
    assert torch.allclose(rebuilt.features, good.features)
    assert "rebuilding" in caplog.text
    enc3 = CountingEncoder()
    image_features(enc3, dataset, "val", tmp_path)
    assert enc3.calls == 0, "the rebuilt cache was not written back"


def test_unknown_split_is_named(dataset):
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        dataset.split("dev")
