"""One interface for every image-classification dataset pfpl trains on.

A dataset has class names, domain names, a content fingerprint (it keys the feature cache) and
train/val/test splits; each split is images with a class label and a domain label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pfpl.errors import DatasetError

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """Images of one split; ``load(i)`` gives image ``i`` as an RGB PIL image."""

    labels: np.ndarray
    domains: np.ndarray
    load: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.labels)


class UnreadableImage(DatasetError):
    """One image that cannot be decoded; feature extraction skips and counts these (``max_unreadable``)."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {path} ({reason})")
        self.path = path


class VisionDataset(ABC):
    name: str
    classnames: list[str]
    domainnames: list[str]
    parallel_load = False  # whether DataLoader workers may call split(...).load (each worker its own copy)
    workers = 0  # DataLoader workers for the one-time feature extraction
    max_unreadable = 0.0  # fraction of a split's images that may be unreadable (skipped and counted)

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever any image, label or split membership could change."""

    @abstractmethod
    def split(self, name: str) -> SplitData: ...

    def captions(self, name: str) -> list[str] | None:
        """A caption per image of split ``name``, where the dataset has them (else None)."""
        return None

    def _check_split(self, name: str) -> None:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
