"""Datasets (the synthetic shapes world and real ones on disk), partitions and the feature cache."""

from __future__ import annotations

from pfpl.data.base import SPLITS, DatasetError, SplitData, VisionDataset
from pfpl.data.shapes_dataset import ShapesDataset

__all__ = ["DATASETS", "SPLITS", "DatasetError", "ShapesDataset", "SplitData", "VisionDataset", "build_dataset"]


def _shapes(cfg) -> VisionDataset:
    return ShapesDataset(
        seed=cfg.seed,
        per_class_domain={
            "train": cfg.train_per_class_domain,
            "val": cfg.val_per_class_domain,
            "test": cfg.test_per_class_domain,
        },
        naming=cfg.class_names,
    )


def _on_disk(cfg) -> VisionDataset:
    from pfpl.data.folders import build_folder_dataset

    return build_folder_dataset(cfg)


def _registry() -> dict:
    from pfpl.data.folders import CIFAR, COOP, DOMAINS

    names = [*COOP, "fgvc_aircraft", "imagenet", *CIFAR, *DOMAINS]
    return {"shapes": _shapes, **{name: _on_disk for name in names}}


DATASETS = _registry()  # name -> build(DataConfig): the one place a dataset is chosen


def build_dataset(cfg) -> VisionDataset:
    """The dataset a :class:`pfpl.config.DataConfig` names."""
    if cfg.dataset not in DATASETS:
        raise DatasetError(f"data.dataset={cfg.dataset!r} is not a known dataset; known: {', '.join(DATASETS)}")
    return DATASETS[cfg.dataset](cfg)
