"""``pfpl run``: every configured method on one benchmark, checkpointed after each round.

:func:`run` drives each method's federation — in process (:class:`SimulatedTraining`, over the
engine :mod:`pfpl.federation.wiring` builds) or on a deployment (any :class:`MethodTraining`, e.g.
:mod:`pfpl.federation.flower.driver`) — evaluates it after every round and writes a
:class:`~pfpl.artifacts.RunFolder`. ``--resume`` reloads the checkpoint and continues to the same
final metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pfpl.artifacts import RunFolder, check_run_folder, clear_folder, plot_accuracy
from pfpl.config import Config, build_config
from pfpl.errors import CheckpointError
from pfpl.evaluation.federated import average_rounds, summarize
from pfpl.federation.client import steps_per_round
from pfpl.federation.context import Benchmark
from pfpl.federation.report import (
    auxiliary,
    epsilons,
    group_prompt,
    grouping,
    headline,
    percent,
    privacy_record,
    released,
)
from pfpl.federation.wiring import train_settings
from pfpl.privacy.modes import is_private, mode_of, secret_randomness
from pfpl.privacy.rules import validate_dp

Progress = Callable[[str, int, int], None]
log = logging.getLogger(__name__)


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = cfg.output_dir / f"run-{stamp}"
    k = 1
    while path.exists():
        path = cfg.output_dir / f"run-{stamp}-{k}"
        k += 1
    return path


class MethodTraining(Protocol):
    """One method's federated training as :func:`run` drives it: in process (:class:`SimulatedTraining`)
    or on a deployment (:mod:`pfpl.federation.flower`)."""

    @property
    def round(self) -> int: ...

    def run_round(self) -> dict: ...

    def evaluate(self) -> dict: ...

    def privacy_record(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def finish(self, folder: RunFolder) -> dict:
        """After the last round: write what the run releases, return the summary's extra entries."""


class SimulatedTraining:
    """One method on the in-process simulator."""

    def __init__(self, bench: Benchmark, name: str):
        self.bench, self.name = bench, name
        self.sim, self.plan = bench.engine(name)

    @property
    def round(self) -> int:
        return self.sim.round

    def run_round(self) -> dict:
        return self.sim.run_round()

    def evaluate(self) -> dict:
        return self.bench.evaluate(self.sim.text_features(), self.sim.vision_prompts())

    def privacy_record(self) -> dict:
        return privacy_record(self.plan, epsilons(self.sim, self.plan), self.sim.client_level)

    def state_dict(self) -> dict:
        return self.sim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sim.load_state_dict(state)

    def finish(self, folder: RunFolder) -> dict:
        folder.save_prompts(self.name, released(self.sim, self.bench.partition.clients))
        failures = getattr(self.sim.server.aggregator, "failures", None)
        return {
            **({} if failures is None else {"secure_failures": len(failures)}),
            "privacy": self.plan.describe(),
            "validation": self.bench.validate(self.name, self.sim.text_features(), self.sim.vision_prompts()),
            **grouping(self.sim, self.bench),
            **auxiliary(self.sim, self.bench, self.name),
            **group_prompt(self.sim, self.bench, self.name),
        }


TrainingFactory = Callable[["Benchmark", str], MethodTraining]


def run(
    cfg: Config,
    run_dir: Path,
    state: dict | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    training: TrainingFactory = SimulatedTraining,
) -> dict:
    """Train and evaluate every method of ``cfg`` into ``run_dir``; ``state`` resumes a checkpoint;
    ``training`` makes each method's federation (default: the in-process simulator).

    A new run refuses a non-empty folder unless ``overwrite``. Every input is checked (privacy
    combinations, backbone, dataset, partition, each method's privacy plan) before the run folder
    is touched, so a failed start leaves nothing behind."""
    validate_dp(cfg.dp, cfg.train.methods, cfg.federation, cfg.secfpp.cluster_on)
    if state is None:
        check_run_folder(run_dir, overwrite)
    bench = Benchmark(cfg)
    for name in cfg.train.methods:
        bench.privacy_plan(name)
    folder = RunFolder(run_dir)
    config_dump = json.loads(cfg.model_dump_json())
    if state is None:
        clear_folder(folder.path)
        state = {"config": config_dump, "completed": {}, "history": [], "current": None}
        folder.write_config(config_dump)
    fingerprints = {"backbone": bench.backbone.fingerprint, "dataset": bench.dataset.fingerprint}
    if state.setdefault("fingerprints", fingerprints) != fingerprints:
        raise CheckpointError(
            f"{run_dir} was trained with backbone/dataset fingerprints {state['fingerprints']}, but they are now "
            f"{fingerprints}; resuming would mix two different models or datasets"
        )
    folder.write_partition(
        {
            "scheme": bench.partition.scheme,
            "params": bench.partition.params,
            "novel_classes": [bench.dataset.classnames[c] for c in bench.novel],
            "held_out_domains": [bench.dataset.domainnames[d] for d in bench.held_out_domains],
            "clients": bench.counts_table(),
        }
    )
    zero_shot = headline(bench.evaluate(bench.reference))
    history: list[dict] = state["history"]
    t_start = time.time()
    for name in cfg.train.methods:
        if name in state["completed"]:
            continue
        sim = training(bench, name)
        current = state.get("current")
        if current and current["method"] == name:
            sim.load_state_dict(current["sim"])
        while sim.round < cfg.federation.rounds:
            t0 = time.time()
            info = sim.run_round()
            if is_private(cfg.dp) or math.isnan(info["loss"]):  # the un-noised loss is not covered by ε
                info.pop("loss")
            result = sim.evaluate()
            record = sim.privacy_record()
            recent = state.setdefault("recent", {}).setdefault(name, [])
            recent[:] = [*recent, result["per_client"]][-REPORT_ROUNDS[cfg.evaluation.report] :]
            history.append(
                {
                    "method": name,
                    "round": sim.round,
                    **headline(result),
                    **info,
                    **record,
                    "seconds": round(time.time() - t0, 3),
                }
            )
            state["current"] = {"method": name, "sim": sim.state_dict()}
            if sim.round == cfg.federation.rounds:
                reported = reported_result(recent)
                state["completed"][name] = {
                    **headline(reported),
                    **record,
                    **sim.finish(folder),
                    "per_client": reported["per_client"],
                    "rounds_reported": len(recent),
                }
                state["current"] = None
                state["recent"].pop(name)
            folder.save_checkpoint(state)
            folder.write_metrics(history)
            row = history[-1]
            eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
            log.info(
                "%s round %d/%d: local %s, neighbor %s, ε %s, %.1f s",
                name,
                sim.round,
                cfg.federation.rounds,
                percent(row["local"]),
                percent(row["neighbor"]),  # None where no class is held only by others
                eps,
                row["seconds"],
            )
            if progress:
                progress(name, sim.round, cfg.federation.rounds)
    summary = {
        "methods": {m: state["completed"][m] for m in cfg.train.methods},
        "zero_shot": zero_shot,
        "run_dir": str(run_dir),
        "seconds": round(time.time() - t_start, 1),
        "setup": {
            "backbone": bench.backbone.name,
            "dataset": bench.dataset.name,
            "seed": cfg.seed,
            "n_clients": cfg.federation.n_clients,
            "partition": cfg.federation.partition,
            "rounds": cfg.federation.rounds,
            "sync": cfg.federation.sync,
            "dp": cfg.dp.mode,
            "randomness": "secret" if secret_randomness(cfg.dp) else "seeded",
            "local_steps": steps_per_round(bench.partition.sizes(), train_settings(cfg)),
            "report": cfg.evaluation.report,
            "novel_fraction": cfg.evaluation.novel_fraction,
            "novel_classes": len(bench.novel),
            "held_out_domain": cfg.evaluation.held_out_domain,
        },
    }
    folder.write_summary(summary)
    folder.write_figure("accuracy.png", plot_accuracy(history, zero_shot, run_title(summary["setup"], cfg)))
    return summary


#: evaluation.report -> how many of the last rounds' accuracies the summary averages
REPORT_ROUNDS = {"final": 1, "mean-last-10": 10}


def reported_result(recent: list[dict]) -> dict:
    """The summary's accuracies: the per-client scores averaged over the rounds kept (one for
    ``final``; the last 10, or all if fewer, for ``mean-last-10``), then their mean ± std over clients."""
    return summarize(average_rounds(recent))


def run_title(setup: dict, cfg: Config) -> str:
    """One line that says what a run's plot shows."""
    dp = cfg.dp
    privacy = (
        "no DP"
        if not mode_of(dp).noises
        else f"DP {dp.mode}, δ = {dp.delta:g}"
        + (f", target ε = {dp.target_epsilon:g}" if dp.target_epsilon is not None else f", σ = {dp.noise_multiplier:g}")
    )
    if dp.client_clip > 0:
        privacy += f"; client-level clip {dp.client_clip:g}, σ_c = {dp.client_noise_multiplier:g}"
    held = (f", {setup['novel_classes']} novel classes held out" if setup.get("novel_classes") else "") + (
        f", domain {setup['held_out_domain']} held out" if setup.get("held_out_domain") else ""
    )
    return (
        f"{setup['backbone']} on {setup['dataset']}: {setup['n_clients']} clients, {setup['partition']} split{held}, "
        f"{setup['sync']} sync, seed {setup['seed']}; {privacy}"
    )


def resume(run_dir: Path, progress: Progress | None = None, training: TrainingFactory = SimulatedTraining) -> dict:
    """Continue a killed run from its last completed round."""
    state = RunFolder(run_dir).load_checkpoint()
    cfg = build_config(state["config"])
    return run(cfg, run_dir, state, progress, training=training)
