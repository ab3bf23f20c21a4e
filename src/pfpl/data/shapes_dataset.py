"""The shapes world behind the dataset interface: balanced class × style splits."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from pfpl.data import shapes
from pfpl.data.base import SPLITS, SplitData, VisionDataset


class ShapesDataset(VisionDataset):
    """Train/val/test streams of the world, each ``n`` images per class and style."""

    name = "shapes"

    def __init__(
        self,
        seed: int = 0,
        per_class_domain: dict[str, int] | None = None,
        image_size: int = 64,
        workers: int = 1,
        naming: str = "curated",
    ):
        self.spec = shapes.WorldSpec(seed=seed, image_size=image_size)
        self.per_class_domain = {"train": 20, "val": 4, "test": 10, **(per_class_domain or {})}
        self.classnames = shapes.class_names(naming)  # names never change pixels
        self.domainnames = list(shapes.STYLES)
        self.workers = workers
        self._cache: dict[str, np.ndarray] = {}

    @property
    def fingerprint(self) -> str:
        counts = ",".join(f"{k}={v}" for k, v in sorted(self.per_class_domain.items()))
        return hashlib.sha256(f"{self.spec.fingerprint()}/{counts}".encode()).hexdigest()[:16]

    def split(self, name: str) -> SplitData:
        self._check_split(name)
        labels, domains = shapes.sample_layout(self.per_class_domain[name])

        def load(i: int) -> Image.Image:
            if name not in self._cache:
                self._cache[name] = shapes.render_parallel(self.spec, name, labels, domains, self.workers)
            return Image.fromarray(self._cache[name][i], "RGB")

        return SplitData(labels=labels, domains=domains, load=load)

    def captions(self, name: str) -> list[str]:
        """The world's captions of split ``name`` (the captions' own colour words)."""
        self._check_split(name)
        labels, domains = shapes.sample_layout(self.per_class_domain[name])
        out = []
        for i, (y, d) in enumerate(zip(labels.tolist(), domains.tolist())):
            colour, shape = list(shapes.COLOURS)[y // len(shapes.SHAPES)], shapes.SHAPES[y % len(shapes.SHAPES)]
            rng = np.random.default_rng(np.random.SeedSequence([self.spec.seed, 98, SPLITS.index(name), i]))
            background = shapes.background_item(self.spec, name, i, y, d)
            out.append(shapes.caption(shape, colour, shapes.STYLES[d], rng, background=background))
        return out
