"""Datasets, the synthetic shapes world, partitions and the image-feature cache."""

from __future__ import annotations

from pfpl.data.base import SPLITS, DatasetError, SplitData, VisionDataset
from pfpl.data.shapes_dataset import ShapesDataset

__all__ = ["SPLITS", "DatasetError", "ShapesDataset", "SplitData", "VisionDataset", "build_dataset"]


def build_dataset(cfg) -> VisionDataset:
    """The dataset a :class:`pfpl.config.DataConfig` names."""
    if cfg.dataset == "shapes":
        return ShapesDataset(
            seed=cfg.seed,
            per_class_domain={
                "train": cfg.train_per_class_domain,
                "val": cfg.val_per_class_domain,
                "test": cfg.test_per_class_domain,
            },
            naming=cfg.class_names,
        )
    raise DatasetError(f"data.dataset={cfg.dataset!r} is not a known dataset; known: shapes")
