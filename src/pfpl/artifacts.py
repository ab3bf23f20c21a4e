"""What a run leaves in its folder: config, per-round metrics (JSONL), final summary (JSON + CSV),
a plot of accuracy per round per method, and the checkpoint — all written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be resumed from."""


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; is this a pfpl run folder?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}); the run cannot be resumed") from None
    if not isinstance(state, dict) or "completed" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a pfpl run checkpoint")
    return state


def write_summary_csv(path: Path, summary: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "local", "local_std", "neighbor", "neighbor_std"])
    rows = [("zero_shot", summary["zero_shot"])] + list(summary["methods"].items())
    for name, m in rows:
        writer.writerow([name] + [f"{m[k]:.4f}" for k in ("local", "local_std", "neighbor", "neighbor_std")])
    atomic_write_text(path, buf.getvalue())


def plot_accuracy(path: Path, history: list[dict], zero_shot: dict) -> None:
    """Local and neighbor accuracy per round, one line per method; zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in history))
    for ax, key in zip(axes, ("local", "neighbor")):
        for i, m in enumerate(methods):
            rows = [r for r in history if r["method"] == m]
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=m, color=f"C{i}")
        ax.axhline(zero_shot[key], ls="--", color="gray", label="zero-shot")
        ax.set_title(f"{key} accuracy")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over clients)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
