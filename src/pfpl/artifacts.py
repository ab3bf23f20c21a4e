"""A run folder, written and read through one typed class (every write atomic).

``runs/run-<time>/`` holds ``config.json``, ``partition.json`` (per-client class and domain counts),
``metrics.jsonl`` (per round and method), ``summary.json`` + ``summary.csv``, ``accuracy.png``,
``prompts-<method>.pt`` (every client's released prompt, and its vision prompts where the method has
them) and ``checkpoint.pt``; an audit adds ``audit.json`` and ``audit.png``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfpl.errors import CheckpointError
from pfpl.evaluation import SCORES


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


def check_run_folder(path: Path | str, overwrite: bool = False) -> None:
    """Refuse to write a new run into a folder that already holds something (a finished or killed run
    would be mixed with the new one); ``overwrite`` allows it (the folder is cleared before writing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--out {path} is a file, not a run folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        hint = (
            f"continue it with pfpl run --resume {path}"
            if (path / "checkpoint.pt").is_file()
            else "choose another --out"
        )
        raise CheckpointError(f"run folder {path} is not empty; {hint}, or pass --overwrite to replace it")


def clear_folder(path: Path) -> None:
    """Remove everything in ``path`` (a run folder about to be rewritten)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def save_torch(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


@dataclass
class ReleasedPrompts:  # tensors: torch is imported by whoever builds one
    """Every client's released prompt of one method, and the parameters it was made from."""

    context: Any  # torch.Tensor [N, M, D] (or [N, C, M, D]): what each client releases
    shared: dict[str, Any]  # torch.Tensor [G, ...]: the server's shared parameters per group
    groups: Any  # torch.Tensor [N]: each client's group
    local: dict[str, Any]  # torch.Tensor [N, ...]
    clients: list[Any]  # torch.Tensor: each client's training-record indices
    #: torch.Tensor [N, depth, P, W]: each client's released vision prompts (None: the method has none,
    #: or the folder was written before runs kept them)
    vision: Any = None


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
        rows = [("zero_shot", summary["zero_shot"])] + list(summary["methods"].items())
        keys = [k for score in SCORES for k in (score, f"{score}_std") if k in rows[0][1]]
        writer.writerow(["method", *keys])
        for name, m in rows:
            writer.writerow([name] + ["" if m.get(k) is None else f"{m[k]:.4f}" for k in keys])
        atomic_write_text(self.file("summary.csv"), buf.getvalue())

    def read_summary(self) -> dict:
        return json.loads(self.file("summary.json").read_text())

    # ---- checkpoint and prompts ----------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        save_torch(self.file("checkpoint.pt"), state)

    def has_checkpoint(self) -> bool:
        return self.file("checkpoint.pt").is_file()

    def load_checkpoint(self) -> dict:
        import torch

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
                **({} if prompts.vision is None else {"vision": prompts.vision}),
            },
        )

    def load_prompts(self, method: str) -> ReleasedPrompts:
        import torch

        path = self.prompts_file(method)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return ReleasedPrompts(
                raw["context"], raw["shared"], raw["groups"], raw["local"], list(raw["clients"]), raw.get("vision")
            )
        except Exception as exc:
            raise CheckpointError(f"released prompts {path} are unreadable ({type(exc).__name__})") from None

    # ---- figures and audits --------------------------------------------------------------------
    def write_figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        atomic_write_bytes(self.file(name), figure_bytes(fig))
        plt.close(fig)

    def write_audit(self, report: dict) -> None:
        write_json(self.file("audit.json"), report)


def panels(n: int):
    """A figure of ``n`` accuracy panels sharing the y axis, at most three to a row; unused cells
    hidden. Returns the figure and the ``n`` axes."""
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows + 0.6), sharey=True, squeeze=False)
    cells = list(grid.flat)
    for ax in cells[n:]:
        ax.set_visible(False)
    return fig, cells[:n]


def legend_below(fig, axes, ncol: int | None = None) -> None:
    """One legend for the figure, under the axes, so it never covers a data point."""
    handles, labels = {}, {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    labels = list(handles)
    fig.legend(
        [handles[x] for x in labels],
        labels,
        loc="lower center",
        ncol=ncol or min(len(labels), 7),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def plot_accuracy(history: list[dict], zero_shot: dict, title: str = ""):
    """Local and neighbor accuracy per round (and base, novel, hm, held-out domain where the run
    measures them), one line per method (its final ε in the legend);
    zero-shot dashed; whole rounds on the x axis; the run described in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = ("local", "neighbor") + tuple(k for k in ("base", "novel", "hm", "held_out_domain") if k in history[0])
    fig, axes = panels(len(keys)) if len(keys) > 2 else plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in history))
    for ax, key in zip(axes, keys):
        for i, m in enumerate(methods):
            rows = [r for r in history if r["method"] == m]
            eps = rows[-1].get("epsilon")
            kind = rows[-1].get("epsilon_kind", "none")
            label = (
                m
                if kind == "none"
                else f"{m} (ε = {'∞' if eps is None else f'{eps:.3g}'}" + (", nominal)" if kind == "nominal" else ")")
            )
            values = [float("nan") if r.get(key) is None else r[key] for r in rows]  # None: nothing to measure
            ax.plot([r["round"] for r in rows], values, marker="o", ms=3, label=label, color=f"C{i}")
        if zero_shot.get(key) is not None:
            ax.axhline(zero_shot[key], ls="--", color="gray", label="zero-shot")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key} accuracy")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over clients)")
    if title:
        fig.suptitle(title, fontsize=10)
    legend_below(fig, axes)
    return fig
