"""Image features, computed once per (backbone, dataset, split, preprocessing) and cached on disk.

The cache key is a hash of the backbone's weight fingerprint, the dataset's content fingerprint, the
split and the preprocessing, so a changed backbone or dataset never reuses stale features. Files are
written atomically and carry a checksum; a truncated or corrupt file is rebuilt, not crashed on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pfpl.data.base import UnreadableImage, VisionDataset
from pfpl.errors import DatasetError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class ImageEncoder(Protocol):
    fingerprint: str
    preprocess_id: str
    preprocess: object

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Features:
    """Normalised image features of one split with their labels and domains."""

    features: torch.Tensor  # [N, E] float32
    labels: torch.Tensor  # [N] int64
    domains: torch.Tensor  # [N] int64
    #: [N, P, E] the records' patch features, where a method needs them (FedOTP; cached apart, see
    #: :class:`pfpl.backbones.patches.PatchEncoder`); None: pooled features only
    tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> Features:
        index = torch.as_tensor(index, dtype=torch.long).to(self.features.device)
        tokens = self.tokens[index.to(self.tokens.device)] if self.tokens is not None else None
        return Features(self.features[index], self.labels[index], self.domains[index], tokens)

    def to(self, device: torch.device | str) -> Features:
        tokens = self.tokens.to(device) if self.tokens is not None else None
        return Features(self.features.to(device), self.labels.to(device), self.domains.to(device), tokens)


def cache_key(encoder: ImageEncoder, dataset: VisionDataset, split: str) -> str:
    text = (
        f"v{FORMAT_VERSION}|{encoder.fingerprint}|{dataset.name}:{dataset.fingerprint}|{split}|{encoder.preprocess_id}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, key: str) -> Features | None:
    """The cached features, or None when the file is missing, stale, truncated or corrupt."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("features", "labels", "domains")}
        ok = meta.get("key") == key and meta.get("checksum") == _checksum(tensors)
        ok = ok and tensors["features"].shape[0] == tensors["labels"].shape[0] == tensors["domains"].shape[0]
    except Exception as exc:  # safetensors raises several error types on damaged files
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if not ok:
        log.warning("feature cache %s failed its integrity check; rebuilding it", path)
        return None
    return Features(**tensors)


def _write(path: Path, key: str, feats: Features, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {
        "features": feats.features.contiguous(),
        "labels": feats.labels.contiguous(),
        "domains": feats.domains.contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"key": key, "checksum": _checksum(tensors), **meta})
    os.replace(tmp, path)


class _Preprocessed(torch.utils.data.Dataset):
    """Image i preprocessed, or None when it cannot be read (skipped and counted by the caller)."""

    def __init__(self, load, preprocess, n: int):
        self.load, self.preprocess, self.n = load, preprocess, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(self.load(i)), None
        except UnreadableImage as exc:
            return i, None, str(exc)


def _collate(items):
    return items


@torch.no_grad()
def encode_split(encoder: ImageEncoder, dataset: VisionDataset, split: str, batch_size: int = 256) -> Features:
    """Run the frozen image tower over one split (no cache): a DataLoader with the dataset's workers
    decodes and preprocesses, a progress bar shows on a terminal, unreadable images are skipped and
    counted (fatal past ``dataset.max_unreadable`` of the split)."""
    import sys

    from tqdm import tqdm

    data = dataset.split(split)
    workers = dataset.workers if dataset.parallel_load else 0
    loader = torch.utils.data.DataLoader(
        _Preprocessed(data.load, encoder.preprocess, len(data)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    chunks, kept, bad = [], [], []
    bar = tqdm(loader, desc=f"{dataset.name} {split} features", unit="batch", disable=not sys.stderr.isatty())
    for items in bar:
        good = [(i, x) for i, x, _ in items if x is not None]
        bad += [why for _, x, why in items if x is None]
        if good:
            kept += [i for i, _ in good]
            chunks.append(encoder.encode_images(torch.stack([x for _, x in good])).float().cpu())
    if bad:
        share = len(bad) / max(1, len(data))
        if share > dataset.max_unreadable:
            raise DatasetError(
                f"{len(bad)} of {len(data)} {split} images of {dataset.name} are unreadable ({share:.1%}, more than "
                f"data.max_unreadable = {dataset.max_unreadable:.1%}); first: {bad[0]}"
            )
        log.warning("skipped %d unreadable %s image(s) of %s; first: %s", len(bad), split, dataset.name, bad[0])
    feats = torch.cat(chunks) if chunks else torch.empty(0, 0)
    index = torch.as_tensor(kept, dtype=torch.long)
    return Features(
        feats,
        torch.as_tensor(data.labels, dtype=torch.long)[index],
        torch.as_tensor(data.domains, dtype=torch.long)[index],
    )


def image_features(
    encoder: ImageEncoder, dataset: VisionDataset, split: str, cache_dir: Path | str | None, batch_size: int = 256
) -> Features:
    """Features of ``split``, from the cache when a valid entry exists, else computed and cached."""
    if cache_dir is None:
        return encode_split(encoder, dataset, split, batch_size)
    key = cache_key(encoder, dataset, split)
    path = Path(cache_dir) / "features" / f"{dataset.name}-{split}-{key}.safetensors"
    cached = _read(path, key)
    if cached is not None:
        return cached
    if path.exists():
        path.unlink()
    feats = encode_split(encoder, dataset, split, batch_size)
    meta = {
        "dataset": dataset.name,
        "split": split,
        "backbone": encoder.fingerprint,
        "dataset_fingerprint": dataset.fingerprint,
        "preprocess": json.dumps(encoder.preprocess_id),
    }
    _write(path, key, feats, meta)
    return feats
