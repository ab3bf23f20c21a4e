"""``pfpl run``: every configured method on one benchmark, checkpointed after each round.

The run folder holds the config, the partition's per-client class and domain counts, per-round
metrics (JSONL), the final summary (JSON + CSV), a plot, and ``checkpoint.pt``. ``--resume`` reloads
the checkpoint and continues to the same final metrics as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from pfpl import artifacts
from pfpl.algorithms.base import MethodSettings
from pfpl.algorithms.methods import METHODS
from pfpl.backbones import PromptTower, load_backbone
from pfpl.config import Config, build_config
from pfpl.data import build_dataset
from pfpl.data.features import image_features
from pfpl.data.partitions import make_partition
from pfpl.evaluation.federated import EvalPlan, evaluate_clients
from pfpl.evaluation.zeroshot import zero_shot_text_features
from pfpl.federation.simulator import EngineSettings, Simulator, steps_per_round
from pfpl.privacy.mechanisms import build_privacy, validate_dp


def engine_settings(cfg: Config) -> EngineSettings:
    f, t = cfg.federation, cfg.train
    return EngineSettings(rounds=f.rounds, local_steps=f.local_steps, batch_size=f.batch_size, sync=f.sync,
                          participation=f.participation, lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay, cosine=t.cosine, seed=cfg.seed)


def method_settings(cfg: Config) -> MethodSettings:
    t = cfg.train
    return MethodSettings(rank=t.rank, init_std=cfg.prompt.init_std, fedpgp_mu=t.fedpgp_mu,
                          fedpgp_temperature=t.fedpgp_temperature)


class Benchmark:
    """Backbone, cached features, partition and evaluation plan shared by every method of a run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.device, str(cfg.cache_dir))
        self.dataset = build_dataset(cfg.data)
        self.train = image_features(self.backbone, self.dataset, "train", cfg.cache_dir)
        self.test = image_features(self.backbone, self.dataset, "test", cfg.cache_dir)
        f = cfg.federation
        self.partition = make_partition(self.train.labels.numpy(), self.train.domains.numpy(), f.n_clients,
                                        f.partition, cfg.seed, alpha=f.alpha, classes_per_client=f.classes_per_client)
        self.plan = EvalPlan.build(self.partition, self.train, self.test)
        self.tower = PromptTower(self.backbone, self.dataset.classnames, cfg.prompt.n_ctx,
                                 max_sequences=cfg.train.max_sequences)
        self.reference = zero_shot_text_features(self.backbone, self.dataset.classnames, cfg.prompt.template)

    def counts_table(self) -> list[dict]:
        return self.partition.counts_table(self.train.labels.numpy(), self.train.domains.numpy(),
                                           self.dataset.classnames, self.dataset.domainnames)

    def simulator(self, method_name: str) -> Simulator:
        method = METHODS[method_name](method_settings(self.cfg))
        return Simulator(method, self.tower, self.train, self.partition.clients, engine_settings(self.cfg),
                         self.backbone.logit_scale, self.reference)

    def evaluate(self, text_features: torch.Tensor) -> dict:
        return evaluate_clients(text_features, self.test, self.plan)


def _finite(value: float) -> float | None:
    """ε for JSON: ``None`` stands for ∞ (no privacy)."""
    return None if math.isinf(value) else float(value)


def _headline(result: dict) -> dict:
    return {k: result[k] for k in ("local", "local_std", "neighbor", "neighbor_std")}


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = cfg.output_dir / f"run-{stamp}"
    k = 1
    while path.exists():
        path = cfg.output_dir / f"run-{stamp}-{k}"
        k += 1
    return path


def run(cfg: Config, run_dir: Path, state: dict | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train and evaluate every method of ``cfg`` into ``run_dir``; ``state`` resumes a checkpoint."""
    validate_dp(cfg.dp, cfg.train.methods)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    config_dump = json.loads(cfg.model_dump_json())
    if state is None:
        state = {"config": config_dump, "completed": {}, "history": [], "current": None}
        artifacts.write_json(run_dir / "config.json", config_dump)
    bench = Benchmark(cfg)
    fingerprints = {"backbone": bench.backbone.fingerprint, "dataset": bench.dataset.fingerprint}
    if state.setdefault("fingerprints", fingerprints) != fingerprints:
        raise artifacts.CheckpointError(
            f"{run_dir} was trained with backbone/dataset fingerprints {state['fingerprints']}, but they are now "
            f"{fingerprints}; resuming would mix two different models or datasets")
    artifacts.write_json(run_dir / "partition.json", {"scheme": bench.partition.scheme,
                                                      "params": bench.partition.params,
                                                      "clients": bench.counts_table()})
    zero_shot = _headline(bench.evaluate(bench.reference))
    history: list[dict] = state["history"]
    t_start = time.time()
    for name in cfg.train.methods:
        if name in state["completed"]:
            continue
        sim = bench.simulator(name)
        plan = build_privacy(sim, cfg.dp, cfg.federation.rounds, name)
        current = state.get("current")
        if current and current["method"] == name:
            sim.load_state_dict(current["sim"])
        while sim.round < cfg.federation.rounds:
            t0 = time.time()
            info = sim.run_round()
            result = bench.evaluate(sim.text_features())
            eps = plan.epsilons(sim.participations) if plan else [math.inf] * sim.n_clients
            history.append({"method": name, "round": sim.round, **_headline(result), **info,
                            "epsilon": _finite(max(eps)), "epsilon_per_client": [_finite(e) for e in eps],
                            "seconds": round(time.time() - t0, 3)})
            state["current"] = {"method": name, "sim": sim.state_dict()}
            if sim.round == cfg.federation.rounds:
                artifacts.save_checkpoint(run_dir / f"prompts-{name}.pt", {
                    "context": sim.personalized_context(), "params": sim.params,
                    "clients": [torch.as_tensor(ix) for ix in bench.partition.clients]})
                state["completed"][name] = {
                    **_headline(result), "epsilon": _finite(max(eps)),
                    "epsilon_per_client": [_finite(e) for e in eps],
                    "privacy": plan.describe() if plan else {"mode": "off"},
                    "client_level_epsilon": plan.client_level_epsilon(cfg.federation.rounds) if plan else None,
                    "per_client": result["per_client"]}
                state["current"] = None
            artifacts.save_checkpoint(ckpt_path, state)
            artifacts.write_jsonl(run_dir / "metrics.jsonl", history)
            if progress:
                progress(name, sim.round, cfg.federation.rounds)
    summary = {
        "methods": {m: state["completed"][m] for m in cfg.train.methods},
        "zero_shot": zero_shot,
        "run_dir": str(run_dir),
        "seconds": round(time.time() - t_start, 1),
        "setup": {"backbone": bench.backbone.name, "dataset": bench.dataset.name, "seed": cfg.seed,
                  "n_clients": cfg.federation.n_clients, "partition": cfg.federation.partition,
                  "rounds": cfg.federation.rounds, "sync": cfg.federation.sync, "dp": cfg.dp.mode,
                  "local_steps": steps_per_round(bench.partition.sizes(), engine_settings(cfg))},
    }
    artifacts.write_json(run_dir / "summary.json", summary)
    artifacts.write_summary_csv(run_dir / "summary.csv", summary)
    artifacts.plot_accuracy(run_dir / "accuracy.png", history, zero_shot)
    return summary


def resume(run_dir: Path, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Continue a killed run from its last completed round."""
    state = artifacts.load_checkpoint(run_dir / "checkpoint.pt")
    cfg = build_config(state["config"])
    return run(cfg, run_dir, state, progress)


def progress_bar(total: int, enabled: bool):
    """A rich progress bar over rounds, or a no-op when disabled (tests, pipes)."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
