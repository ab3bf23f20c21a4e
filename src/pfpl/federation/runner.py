"""``pfpl run``: every configured method on one benchmark, checkpointed after each round.

:class:`Benchmark` is what every method of a run shares (backbone, cached features, partition,
evaluation plan, prompt tower); :func:`build_engine` puts together one method's simulator and
privacy plan from the config; :func:`run` trains and evaluates every method into a
:class:`~pfpl.artifacts.RunFolder`. ``--resume`` reloads the checkpoint and continues to the same
final metrics as an uninterrupted run of the same seed.
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

import numpy as np
import torch

from pfpl.algorithms import AUXILIARY_METHODS, get_method
from pfpl.algorithms.base import Method, MethodSettings
from pfpl.artifacts import ReleasedPrompts, RunFolder, check_run_folder, clear_folder, plot_accuracy
from pfpl.backbones import PromptTower, load_backbone
from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.config import Config, build_config
from pfpl.data import build_dataset
from pfpl.data.clients import ClientData
from pfpl.data.features import Features, image_features
from pfpl.data.partitions import make_partition
from pfpl.errors import CheckpointError, ConfigError
from pfpl.evaluation.federated import EvalPlan, evaluate_clients
from pfpl.evaluation.zeroshot import zero_shot_text_features
from pfpl.federation.client import TrainSettings, steps_per_round
from pfpl.federation.simulator import Simulator
from pfpl.messages import WeightedMean
from pfpl.privacy.clipping import quantile_clip, record_gradient_norms
from pfpl.privacy.defaults import private_sgd as private_sgd_default
from pfpl.privacy.modes import is_private, mode_of, secret_randomness
from pfpl.privacy.plan import MethodLeaves, PrivacyPlan, TrainingShape, plan_privacy
from pfpl.privacy.rules import validate_dp
from pfpl.prompts.coop import phrase_context
from pfpl.streams import SERVER, Streams

Progress = Callable[[str, int, int], None]
log = logging.getLogger(__name__)


def private_sgd(cfg: Config) -> tuple[float, float]:
    """(learning rate, momentum) of this run: train's for a non-private run, dp's (or pfpl's default for
    the mechanism and target ε, :mod:`pfpl.privacy.defaults`) for a private one."""
    t, dp = cfg.train, cfg.dp
    if not mode_of(dp).noises:
        return t.lr, t.momentum
    chosen = private_sgd_default(dp.mode, dp.target_epsilon) if dp.target_epsilon else None
    lr, momentum = chosen or (t.lr, t.momentum)
    return (dp.lr if dp.lr is not None else lr), (dp.momentum if dp.momentum is not None else momentum)


def train_settings(cfg: Config) -> TrainSettings:
    f, t = cfg.federation, cfg.train
    lr, momentum = private_sgd(cfg)
    sampling = cfg.dp.sampling if mode_of(cfg.dp).noises else "shuffle"
    return TrainSettings(
        rounds=f.rounds,
        local_steps=f.local_steps,
        batch_size=f.batch_size,
        sync=f.sync,
        participation=f.participation,
        client_sampling=f.client_sampling,
        dropout=f.dropout,
        lr=lr,
        momentum=momentum,
        weight_decay=t.weight_decay,
        cosine=t.cosine,
        seed=cfg.seed,
        sampling=sampling,
        private=is_private(cfg.dp),
    )


def method_settings(cfg: Config, backbone: OpenClipBackbone) -> MethodSettings:
    """The methods' settings from the config; ``backbone`` embeds the initialisation phrase."""
    t, s = cfg.train, cfg.secfpp
    from pfpl.secure.secpc import SecPCSettings

    secpc = SecPCSettings(
        projection_dim=s.projection_dim,
        frac_bits=s.frac_bits,
        slices=s.lcc_slices,
        privacy=s.lcc_privacy,
        initial_clusters=s.initial_clusters,
        split_threshold=s.split_threshold,
        merge_threshold=s.merge_threshold,
        max_iterations=s.max_iterations,
        restarts=s.restarts,
        seed=cfg.seed,
    )
    return MethodSettings(
        rank=t.rank,
        init_std=cfg.prompt.init_std,
        init_ctx=phrase_context(backbone, cfg.prompt.phrase, cfg.prompt.n_ctx) if cfg.prompt.phrase else None,
        fedpgp_mu=t.fedpgp_mu,
        fedpgp_temperature=t.fedpgp_temperature,
        extra={
            "class_rank": s.class_rank,
            "recluster_every": s.recluster_every,
            "cluster_on": s.cluster_on,
            "covers_all_classes": is_private(cfg.dp) and not s.public_label_set,
            "secpc": secpc,
        },
    )


def method_leaves(method: Method) -> MethodLeaves:
    """The privacy plan's view of a method: which of its leaves are private, which are shared."""
    shared = set(method.shared_params)
    return MethodLeaves(
        method.name,
        tuple(x for x in method.leaves if method.is_private_leaf(x)),
        tuple(x for x in method.leaves if method.param_of(x) in shared),
        method.public_facts(),
    )


def shared_numel(method: Method, n_ctx: int, dim: int) -> int:
    """Entries of the (largest) shared parameter: the dimension one secure aggregation sums."""
    shapes = method.init_shared(n_ctx, dim, torch.Generator().manual_seed(0))
    return max((v.numel() for v in shapes.values()), default=0)


def plan_for(cfg: Config, method: Method, sizes: list[int], settings: TrainSettings, dim: int) -> PrivacyPlan:
    """The privacy plan of ``method`` on clients of ``sizes`` (refuses what cannot be accounted)."""
    shape = TrainingShape(
        sizes=tuple(sizes),
        batch_size=settings.batch_size,
        steps_per_round=steps_per_round(sizes, settings) * len(method.stages()),
        rounds=settings.rounds,
        sync=settings.sync,
        participation=settings.participation,
        sampling=settings.sampling,
        client_sampling=settings.client_sampling,
        randomness="secret" if secret_randomness(cfg.dp) else "seeded",
        shared_numel=shared_numel(method, cfg.prompt.n_ctx, dim),
        secure_noise_bits=cfg.secure.noise_bits if cfg.federation.secure_aggregation else None,
        colluders="t - 1 (the most the threshold t tolerates)"
        if cfg.secure.colluders is None
        else f"{cfg.secure.colluders} (secure.colluders)",
    )
    plan = plan_privacy(cfg.dp, method_leaves(method), shape)
    if cfg.federation.secure_aggregation and method.shares:
        check_secure(cfg, plan, sizes, shape.shared_numel, settings)
    return plan


def check_secure(cfg: Config, plan: PrivacyPlan, sizes: list[int], dim: int, settings: TrainSettings) -> None:
    """Refuse, before any training, secure-aggregation settings that break the protocol's rules for an
    instance of every client (:mod:`pfpl.secure.params`), colluders the threshold cannot stop, or a
    ring that could wrap: the size coordinate, the distributed noise's tails and, where clipping
    bounds them, the values (client-level clip S; the shared gradient of per-sample global DP with
    fixed-size batches, ≤ C per client, weighted by n_i)."""
    aggregator = build_aggregator(cfg, plan)
    n = len(sizes)
    threshold = aggregator.settings.threshold_for(n)
    colluders = cfg.secure.colluders
    if colluders is not None and colluders >= threshold:
        raise ConfigError(
            f"config error: secure.colluders = {colluders} is not below the threshold t = {threshold} of {n} "
            "clients: that many colluders could rebuild an honest client's masks; lower it or raise secure.threshold"
        )
    if plan.client_clip > 0:
        bound = plan.client_clip
    elif plan.has_shared_global and settings.sampling == "shuffle" and settings.sync == "step":
        bound = plan.clip * max(sizes)
    else:
        bound = None
    aggregator.check_ring(len(sizes), aggregator.vector_length(dim), max(sizes), bound)


def run_streams(cfg: Config, n_clients: int) -> tuple[Streams, Streams]:
    """(the clients', the server's) mechanism streams of a run: fresh secrets from OS entropy in a
    private run (unless ``dp.randomness = 'seeded'``), the config seed otherwise."""
    secret = secret_randomness(cfg.dp)
    return Streams.create(cfg.seed, range(n_clients), secret), Streams.create(cfg.seed, [SERVER], secret)


def build_aggregator(cfg: Config, plan: PrivacyPlan, clients: Streams | None = None):
    """The server's aggregator: SecAgg+ with the plan's distributed DP, or the plan's plaintext DP
    wrappers around a weighted mean. ``clients``: the clients' mechanism streams, where this process
    plays their side of the protocol (their distributed-DP shares)."""
    if not cfg.federation.secure_aggregation:
        return plan.wrap_aggregator(WeightedMean())
    from pfpl.secure.aggregator import SecureAggregator, SecureSettings

    s = cfg.secure
    settings = SecureSettings(
        ring_bits=s.ring_bits,
        frac_bits=s.frac_bits,
        threshold=s.threshold,
        graph=s.graph,
        degree=s.degree,
        noise_bits=s.noise_bits,
        seed=cfg.seed,
        colluders=s.colluders,
        dropout=s.dropout_tolerance if s.dropout_tolerance is not None else max(0.1, cfg.federation.dropout),
        failure_target=s.failure_target,
    )
    return SecureAggregator(settings, **plan.secure_policy(), clients=clients)


def build_engine(
    cfg: Config,
    method_name: str,
    tower: PromptTower,
    data: ClientData,
    scale: float,
    reference: torch.Tensor | None = None,
    settings: TrainSettings | None = None,
    method: Method | None = None,
) -> tuple[Simulator, PrivacyPlan]:
    """One method's simulator, with the config's sample-level mechanism, DP aggregation and per-round
    privacy charges, and its plan."""
    settings = settings or train_settings(cfg)
    method = method or get_method(method_name)(method_settings(cfg, tower.backbone))
    plan = plan_for(cfg, method, data.sizes(), settings, tower.backbone.ctx_dim)
    clients, server = run_streams(cfg, data.n_clients)
    sim = Simulator(
        method,
        tower,
        data,
        settings,
        scale,
        reference,
        mechanism=plan.gradient_mechanism(),
        aggregator=build_aggregator(cfg, plan, clients),
        charges=plan,
        phases=method.server_phases(),
        streams=clients,
        server_streams=server,
    )
    return sim, plan


class Benchmark:
    """Backbone, cached features, partition and evaluation plan shared by every method of a run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.backbone = load_backbone(
            cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.device, str(cfg.cache_dir)
        )
        self.device = self.backbone.device
        self.dataset = build_dataset(cfg.data)
        self.train = image_features(self.backbone, self.dataset, "train", cfg.cache_dir)
        self.test = image_features(self.backbone, self.dataset, "test", cfg.cache_dir).to(self.device)
        f = cfg.federation
        pool = np.arange(len(self.train))
        self.server_index: np.ndarray | None = None
        if any(m in AUXILIARY_METHODS for m in cfg.train.methods) and cfg.fedsp.server_data == "shard":
            self.server_index = server_shard(self.train, cfg.fedsp.server_fraction, cfg.seed)
            pool = np.setdiff1d(pool, self.server_index)
        partition = make_partition(
            self.train.labels.numpy()[pool],
            self.train.domains.numpy()[pool],
            f.n_clients,
            f.partition,
            cfg.seed,
            alpha=f.alpha,
            classes_per_client=f.classes_per_client,
        )
        partition.clients = [pool[ix] for ix in partition.clients]  # indices into the whole training split
        self.partition = partition
        self._fedsp: dict[bool, object] = {}
        self._val: Features | None = None
        self._val_plan: EvalPlan | None = None
        self._clips: dict[str, float] = {}  # dp.clip_quantile: the clip measured for each method
        self.plan = EvalPlan.build(self.partition, self.train, self.test)
        self.tower = PromptTower(
            self.backbone,
            self.dataset.classnames,
            cfg.prompt.n_ctx,
            max_sequences=cfg.train.max_sequences,
            share_prefix=cfg.train.share_prefix,
        )
        self.reference = zero_shot_text_features(self.backbone, self.dataset.classnames, cfg.prompt.template)

    def counts_table(self) -> list[dict]:
        return self.partition.counts_table(
            self.train.labels.numpy(), self.train.domains.numpy(), self.dataset.classnames, self.dataset.domainnames
        )

    def client_data(self) -> ClientData:
        return ClientData(self.train, self.partition.clients, self.device)

    def privacy_plan(self, method_name: str) -> PrivacyPlan:
        cfg = self.method_config(method_name)
        method = get_method(method_name)(method_settings(cfg, self.backbone))
        return plan_for(cfg, method, self.partition.sizes(), train_settings(cfg), self.backbone.ctx_dim)

    @property
    def val(self) -> Features:
        """The val split's features on the run's device, loaded once: the clip quantile and every method's
        val accuracy share them."""
        if self._val is None:
            self._val = image_features(self.backbone, self.dataset, "val", self.cfg.cache_dir).to(self.device)
        return self._val

    def fedsp(self, distilled: bool):
        """FedSP's auxiliary model and data (built once per run and distillation setting)."""
        if distilled not in self._fedsp:
            from pfpl.federation.fedsp import build_context

            self._fedsp[distilled] = build_context(self, distilled)
        return self._fedsp[distilled]

    def method_config(self, method_name: str) -> Config:
        """The run's config as one method runs it: with ``dp.clip_quantile``, ``dp.clip`` is measured on the
        val split at the method's initial prompt (:mod:`pfpl.privacy.clipping`)."""
        dp = self.cfg.dp
        space = mode_of(dp).clip_space
        if dp.clip_quantile is None or space is None:
            return self.cfg
        if method_name not in self._clips:
            sim, _ = self._engine(method_name, self.cfg)
            val = self.val
            ctx = sim.personalized_context()[0]
            scale = self.backbone.logit_scale
            norms = record_gradient_norms(self.tower, ctx, val.features, val.labels, scale, space)
            self._clips[method_name] = quantile_clip(norms, dp.clip_quantile)
        cfg = self.cfg.model_copy(deep=True)
        cfg.dp.clip = self._clips[method_name]
        return cfg

    def engine(self, method_name: str) -> tuple[Simulator, PrivacyPlan]:
        return self._engine(method_name, self.method_config(method_name))

    def _engine(self, method_name: str, cfg: Config) -> tuple[Simulator, PrivacyPlan]:
        if method_name in AUXILIARY_METHODS:
            from pfpl.federation.fedsp import method_extra

            cls = get_method(method_name)
            context = self.fedsp(cls.distilled)
            settings = method_settings(cfg, self.backbone)
            settings.extra.update(method_extra(context, self))
            return build_engine(
                cfg,
                method_name,
                context.tower,
                context.client_data(self.partition.clients),
                self.backbone.logit_scale,
                self.reference,
                method=cls(settings),
            )
        return build_engine(cfg, method_name, self.tower, self.client_data(), self.backbone.logit_scale, self.reference)

    def evaluate(self, text_features: torch.Tensor) -> dict:
        return evaluate_clients(text_features, self.test, self.plan)

    def validate(self, method_name: str, text_features: torch.Tensor) -> dict | None:
        """Mean local / neighbor accuracy on the val split, where hyper-parameters are chosen (never on
        test); None when the method's server trained on val (FedSP with ``fedsp.server_data = 'val'``)."""
        if method_name in AUXILIARY_METHODS and self.cfg.fedsp.server_data == "val":
            return None
        if self._val_plan is None:
            self._val_plan = EvalPlan.build(self.partition, self.train, self.val)
        result = evaluate_clients(text_features, self.val, self._val_plan)
        return {k: result[k] for k in ("local", "neighbor") if k in result}


def _finite(value: float) -> float | None:
    """ε for JSON: ``None`` stands for ∞ (no privacy)."""
    return None if math.isinf(value) else float(value)


HEADLINE = ("local", "neighbor", "neighbor_same_domain", "cross_domain")


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _headline(result: dict) -> dict:
    """The mean ± std of every accuracy the evaluation plan has."""
    return {k: result[k] for key in HEADLINE for k in (key, f"{key}_std") if k in result}


def server_shard(train: Features, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of every (class, domain) pair of the training split, for the server."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E4F]))
    keys = train.labels.numpy() * (int(train.domains.max()) + 1) + train.domains.numpy()
    out = []
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        out.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(out))


def auxiliary(sim: Simulator, bench: Benchmark, name: str) -> dict:
    """For FedSP: each client's own product (its auxiliary model, body and prompt), the model owner's
    figures (parameters a client holds, distillation, the auxiliary model alone) and the bytes sent."""
    if name not in AUXILIARY_METHODS:
        return {}
    context = bench.fedsp(sim.method.distilled)
    everyone = torch.arange(sim.n_clients)
    params = {**sim.server.broadcast(everyone), **sim.local}
    aux = evaluate_clients(sim.method.auxiliary_features(sim.tower, params), context.test, bench.plan)
    prompt = sim.server.shared["prompt"][0].numel() * 4
    body = sum(v[0].numel() * 4 for k, v in sim.local.items() if k.startswith("body:"))
    up = prompt + (body if sim.method.upload == "reference" else 0)
    return {
        "auxiliary": _headline(aux),
        "fedsp": {
            **context.report,
            "bytes_per_round": {"download": prompt, "upload": up, "body_once": body, "upload_mode": sim.method.upload},
        },
    }


def grouping(sim: Simulator, bench: Benchmark) -> dict:
    """For a method whose server regroups clients: the adjusted Rand index of its final groups
    against the clients' true domains (majority domain of their records), and the clustering log."""
    clustering = [phase for phase in sim.phases if hasattr(phase, "log")]
    if not clustering:
        return {}
    logs = [entry for phase in clustering for entry in phase.log]
    from pfpl.secure.secpc import adjusted_rand_index

    domains = bench.train.domains.numpy()
    truth = [int(np.bincount(domains[ix]).argmax()) for ix in bench.partition.clients]
    return {
        "ari": adjusted_rand_index(sim.server.groups.cpu().numpy(), np.asarray(truth)),
        "groups": int(sim.server.n_groups),
        "clustering": logs,
    }


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = cfg.output_dir / f"run-{stamp}"
    k = 1
    while path.exists():
        path = cfg.output_dir / f"run-{stamp}-{k}"
        k += 1
    return path


def released(sim: Simulator, clients: list) -> ReleasedPrompts:
    return ReleasedPrompts(
        context=sim.personalized_context().cpu(),
        shared={k: v.cpu() for k, v in sim.server.shared.items()},
        groups=sim.server.groups.cpu(),
        local={k: v.cpu() for k, v in sim.local.items()},
        clients=[torch.as_tensor(ix) for ix in clients],
    )


def epsilons(sim: Simulator, plan: PrivacyPlan) -> list[float]:
    """Every client's ε(δ) for its released prompt, from its own accountant."""
    return [plan.client_epsilon(sim.ledgers[c], int(sim.participations[c])) for c in range(sim.n_clients)]


def privacy_record(sim: Simulator, plan: PrivacyPlan) -> dict:
    """ε fields of a metrics row or a method's summary (``None`` stands for ∞)."""
    eps = epsilons(sim, plan)
    client_level = sim.client_level.epsilon(plan.delta) if plan.client_sigma > 0 else None
    return {
        "epsilon": _finite(max(eps)),
        "epsilon_per_client": [_finite(e) for e in eps],
        "epsilon_kind": plan.epsilon_kind,
        "formal_guarantee": plan.formal(),
        "randomness": plan.randomness,
        "client_level_epsilon": client_level,
    }


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
        return self.bench.evaluate(self.sim.text_features())

    def privacy_record(self) -> dict:
        return privacy_record(self.sim, self.plan)

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
            "validation": self.bench.validate(self.name, self.sim.text_features()),
            **grouping(self.sim, self.bench),
            **auxiliary(self.sim, self.bench, self.name),
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
        {"scheme": bench.partition.scheme, "params": bench.partition.params, "clients": bench.counts_table()}
    )
    zero_shot = _headline(bench.evaluate(bench.reference))
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
            history.append(
                {
                    "method": name,
                    "round": sim.round,
                    **_headline(result),
                    **info,
                    **record,
                    "seconds": round(time.time() - t0, 3),
                }
            )
            state["current"] = {"method": name, "sim": sim.state_dict()}
            if sim.round == cfg.federation.rounds:
                state["completed"][name] = {
                    **_headline(result),
                    **record,
                    **sim.finish(folder),
                    "per_client": result["per_client"],
                }
                state["current"] = None
            folder.save_checkpoint(state)
            folder.write_metrics(history)
            row = history[-1]
            eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
            log.info(
                "%s round %d/%d: local %s, neighbor %s, ε %s, %.1f s",
                name,
                sim.round,
                cfg.federation.rounds,
                _percent(row["local"]),
                _percent(row["neighbor"]),  # None where no class is held only by others
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
        },
    }
    folder.write_summary(summary)
    folder.write_figure("accuracy.png", plot_accuracy(history, zero_shot, run_title(summary["setup"], cfg)))
    return summary


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
    return (
        f"{setup['backbone']} on {setup['dataset']}: {setup['n_clients']} clients, {setup['partition']} split, "
        f"{setup['sync']} sync, seed {setup['seed']}; {privacy}"
    )


def resume(run_dir: Path, progress: Progress | None = None, training: TrainingFactory = SimulatedTraining) -> dict:
    """Continue a killed run from its last completed round."""
    state = RunFolder(run_dir).load_checkpoint()
    cfg = build_config(state["config"])
    return run(cfg, run_dir, state, progress, training=training)
