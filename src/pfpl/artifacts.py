"""A run folder, written and read through one typed class (every write atomic).

``runs/run-<time>/`` holds ``config.json``, ``partition.json`` (per-client class and domain counts),
``metrics.jsonl`` (per round and method), ``summary.json`` + ``summary.csv``, ``accuracy.png``,
``prompts-<method>.pt`` (every client's released prompt) and ``checkpoint.pt``; an audit adds
``audit.json`` and ``audit.png``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfpl.errors import CheckpointError


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


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


@dataclass
class ReleasedPrompts:
    """Every client's released prompt of one method, and the parameters it was made from."""

    context: torch.Tensor  # [N, M, D] (or [N, C, M, D]): what each client releases
    shared: dict[str, torch.Tensor]  # [G, ...]: the server's shared parameters per group
    groups: torch.Tensor  # [N]: each client's group
    local: dict[str, torch.Tensor]  # [N, ...]
    clients: list[torch.Tensor]  # each client's training-record indices

    def shared_of(self, client: int) -> dict[str, torch.Tensor]:
        """The shared parameters client ``client`` received last."""
        return {k: v[int(self.groups[client])] for k, v in self.shared.items()}


class RunFolder:
    """The files of one run."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- config, partition, metrics, summary ---------------------------------------------------
    def write_config(self, config: dict) -> None:
        write_json(self.file("config.json"), config)

    def has_config(self) -> bool:
        return self.file("config.json").is_file()

    def read_config(self) -> dict:
        return json.loads(self.file("config.json").read_text())

    def write_partition(self, partition: dict) -> None:
        write_json(self.file("partition.json"), partition)

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.file("metrics.jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def read_metrics(self) -> list[dict]:
        path = self.file("metrics.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def has_summary(self) -> bool:
        return self.file("summary.json").is_file()

    def write_summary(self, summary: dict) -> None:
        write_json(self.file("summary.json"), summary)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["method", "local", "local_std", "neighbor", "neighbor_std"])
        for name, m in [("zero_shot", summary["zero_shot"])] + list(summary["methods"].items()):
            writer.writerow([name] + [f"{m[k]:.4f}" for k in ("local", "local_std", "neighbor", "neighbor_std")])
        atomic_write_text(self.file("summary.csv"), buf.getvalue())

    def read_summary(self) -> dict:
        return json.loads(self.file("summary.json").read_text())

    # ---- checkpoint and prompts ----------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        save_torch(self.file("checkpoint.pt"), state)

    def has_checkpoint(self) -> bool:
        return self.file("checkpoint.pt").is_file()

    def load_checkpoint(self) -> dict:
        path = self.file("checkpoint.pt")
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}; is this a pfpl run folder?")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged files
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({type(exc).__name__}); the run cannot be resumed"
            ) from None
        if not isinstance(state, dict) or "completed" not in state or "config" not in state:
            raise CheckpointError(f"checkpoint {path} is not a pfpl run checkpoint")
        return state

    def prompts_file(self, method: str) -> Path:
        return self.file(f"prompts-{method}.pt")

    def save_prompts(self, method: str, prompts: ReleasedPrompts) -> None:
        save_torch(
            self.prompts_file(method),
            {
                "context": prompts.context,
                "shared": prompts.shared,
                "groups": prompts.groups,
                "local": prompts.local,
                "clients": prompts.clients,
            },
        )

    def load_prompts(self, method: str) -> ReleasedPrompts:
        path = self.prompts_file(method)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return ReleasedPrompts(raw["context"], raw["shared"], raw["groups"], raw["local"], list(raw["clients"]))
        except Exception as exc:
            raise CheckpointError(f"released prompts {path} are unreadable ({type(exc).__name__})") from None

    # ---- figures and audits --------------------------------------------------------------------
    def write_figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        atomic_write_bytes(self.file(name), figure_bytes(fig))
        plt.close(fig)

    def write_audit(self, report: dict) -> None:
        write_json(self.file("audit.json"), report)


def plot_accuracy(history: list[dict], zero_shot: dict):
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
    return fig
