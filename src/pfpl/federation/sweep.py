"""``pfpl sweep``: the privacy–utility trade-off, ε × methods on one benchmark.

Every ε is an ordinary run folder inside the sweep folder, so an interrupted sweep resumes by
skipping finished runs and continuing a killed one from its checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from pfpl.artifacts import RunFolder, atomic_write_bytes, atomic_write_text, figure_bytes, write_json
from pfpl.config import Config, build_config, default_methods_for_privacy
from pfpl.errors import ConfigError
from pfpl.federation.runner import resume, run
from pfpl.federation.wiring import private_sgd
from pfpl.privacy.modes import mode_of
from pfpl.privacy.rules import validate_dp


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def default_methods(cfg: Config) -> tuple[Config, list[str]]:
    """The sweep's base config with the default methods its private runs can account for, and the
    methods left out (:func:`pfpl.config.default_methods_for_privacy`)."""
    methods, left = default_methods_for_privacy(cfg)
    if not left:
        return cfg, []
    data = json.loads(cfg.model_dump_json())
    data["train"]["methods"] = methods
    return build_config(data), left


def sweep_configs(cfg: Config, epsilons: list[float]) -> dict[str, Config]:
    """One config per ε (∞ = no DP); every one is validated before any training starts."""
    mode = cfg.dp.mode if mode_of(cfg.dp).noises else "feature"
    out = {}
    for eps in epsilons:
        data = json.loads(cfg.model_dump_json())
        if math.isinf(eps):
            data["dp"].update(mode="off", target_epsilon=None, noise_multiplier=0.0)
        else:
            data["dp"].update(mode=mode, target_epsilon=eps, noise_multiplier=0.0)
        sub = build_config(data)
        validate_dp(sub.dp, sub.train.methods, sub.federation, sub.secfpp.cluster_on)
        out[_label(eps)] = sub
    return out


def training_config(cfg: Config) -> dict:
    """What a run's training depends on: the config with private runs' learning rate and momentum
    resolved (an explicit ``dp.lr`` equal to the default trains the same run) and without the cache
    and output folders."""
    out = json.loads(cfg.model_dump_json())
    out["dp"]["lr"], out["dp"]["momentum"] = private_sgd(cfg)
    for key in ("cache_dir", "output_dir"):
        out.pop(key, None)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_training(folder: RunFolder, cfg: Config) -> None:
    """A sweep reuses a finished or killed run only if it trained what this sweep would (else its
    numbers would stand in the table for another configuration)."""
    if not folder.has_config():
        return
    stored, wanted = _flat(training_config(build_config(folder.read_config()))), _flat(training_config(cfg))
    differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k} = {stored.get(k)!r} there, {wanted.get(k)!r} here" for k in differ[:3])
        raise ConfigError(f"{folder.path} was trained with another config ({shown}); choose a new sweep folder")


def run_sweep(
    cfg: Config, epsilons: list[float], folder: Path, progress: Callable[[str, str, int, int], None] | None = None
) -> dict:
    configs = sweep_configs(cfg, epsilons)
    for label, sub in configs.items():  # before any training
        check_same_training(RunFolder(folder / f"eps-{label}"), sub)
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for label, sub in configs.items():
        run_dir = folder / f"eps-{label}"
        cb = (lambda m, d, t, label=label: progress(label, m, d, t)) if progress else None
        if RunFolder(run_dir).has_summary():
            summary = RunFolder(run_dir).read_summary()
        elif RunFolder(run_dir).has_checkpoint():
            summary = resume(run_dir, cb)
        else:
            summary = run(sub, run_dir, progress=cb)
        results[label] = summary
    table = {
        "epsilons": list(configs),
        "mode": cfg.dp.mode if mode_of(cfg.dp).noises else "feature",
        "nominal": mode_of(cfg.dp).nominal,
        "randomness": cfg.dp.randomness,  # "seeded": an experiment, no formal guarantee at any ε
        "delta": cfg.dp.delta,
        "methods": {
            m: {
                label: {
                    k: results[label]["methods"][m].get(k)
                    for k in (
                        "local",
                        "neighbor",
                        *EXTRA_SCORES,
                        "epsilon",
                        "epsilon_kind",
                        "formal_guarantee",
                        "validation",
                    )
                }
                for label in configs
            }
            for m in cfg.train.methods
        },
        "zero_shot": next(iter(results.values()))["zero_shot"] if results else None,
    }
    write_json(folder / "sweep.json", table)
    _write_csv(folder / "sweep.csv", table)
    plot_sweep(folder / "sweep.png", table)
    return table


#: scores a sweep reports beside local and neighbor where its runs measure them (base-to-novel,
#: leave-one-domain-out)
EXTRA_SCORES = ("base", "novel", "hm", "held_out_domain")


def _extra(table: dict) -> list[str]:
    rows = [r for by_eps in table["methods"].values() for r in by_eps.values()]
    return [k for k in EXTRA_SCORES if any(r.get(k) is not None for r in rows)]


def _write_csv(path: Path, table: dict) -> None:
    extra = _extra(table)
    header = "method,target_epsilon,achieved_epsilon,epsilon_kind,formal,local,neighbor"
    lines = [",".join([header, *extra, "val_local", "val_neighbor"])]

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for m, by_eps in table["methods"].items():
        for label, r in by_eps.items():
            achieved = "inf" if r["epsilon"] is None else f"{r['epsilon']:.4f}"
            kind = r.get("epsilon_kind") or "none"
            formal = "yes" if r.get("formal_guarantee") else "no"
            val = r.get("validation") or {}
            scores = ",".join(num(r.get(k)) for k in ("local", "neighbor", *extra))
            on_val = ",".join(num(val.get(k)) for k in ("local", "neighbor"))
            lines.append(f"{m},{label},{achieved},{kind},{formal},{scores},{on_val}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_sweep(path: Path, table: dict) -> None:
    """Local and neighbor accuracy against the target ε, one line per method. The targets are evenly
    spaced categories (∞ = no DP is a category, not a point on a numeric axis); zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pfpl.artifacts import legend_below, panels

    labels = table["epsilons"]
    xs = list(range(len(labels)))
    keys = ("local", "neighbor", *_extra(table))
    fig, axes = panels(len(keys)) if len(keys) > 2 else plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    nominal = " — NOMINAL ε, no formal guarantee" if table.get("nominal") else ""
    if table.get("randomness") == "seeded" and not nominal:
        nominal = " — SEEDED noise (an experiment), no formal guarantee"
    for ax, key in zip(axes, keys):
        for i, (m, by_eps) in enumerate(table["methods"].items()):
            values = [float("nan") if by_eps[x].get(key) is None else by_eps[x][key] for x in labels]
            ax.plot(xs, values, marker="o", label=m, color=f"C{i}")
        if table.get("zero_shot") and table["zero_shot"].get(key) is not None:
            ax.axhline(table["zero_shot"][key], ls="--", color="gray", label="zero-shot")
        ax.set_xticks(xs, [("∞ (no DP)" if x == "inf" else x) for x in labels])
        ax.minorticks_off()
        ax.set_xlabel(f"target ε (δ = {table['delta']:g}, {table['mode']} mode){nominal}")
        ax.set_title(f"{key} accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over clients)")
    legend_below(fig, axes)
    atomic_write_bytes(path, figure_bytes(fig))
    plt.close(fig)
