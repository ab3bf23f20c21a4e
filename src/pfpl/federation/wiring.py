"""From a config to one method's engine (DESIGN §4): training and method settings, the privacy plan
(with its secure-aggregation checks), the parties' mechanism streams, the server's aggregator and
the in-process simulator. No run loop and no transport here: :mod:`pfpl.federation.runner` drives
the engine, :mod:`pfpl.federation.flower` carries it over messages."""

from __future__ import annotations

import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import Method, MethodSettings
from pfpl.backbones import PromptTower
from pfpl.backbones.openclip import OpenClipBackbone
from pfpl.config import Config
from pfpl.data.clients import ClientData
from pfpl.errors import ConfigError
from pfpl.federation.client import TrainSettings, steps_per_round
from pfpl.federation.simulator import Simulator
from pfpl.messages import WeightedMean
from pfpl.privacy.defaults import private_sgd as private_sgd_default
from pfpl.privacy.modes import is_private, mode_of, secret_randomness
from pfpl.privacy.plan import MethodLeaves, PrivacyPlan, TrainingShape, plan_privacy
from pfpl.prompts.coop import phrase_context
from pfpl.streams import SERVER, Streams


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
        modality=cfg.prompt.modality,
        vision_shape=vision_shape(cfg, backbone),
        template=cfg.prompt.template,
        extra={
            "class_rank": s.class_rank,
            "recluster_every": s.recluster_every,
            "cluster_on": s.cluster_on,
            "covers_all_classes": is_private(cfg.dp) and not s.public_label_set,
            "secpc": secpc,
            "promptfolio_theta": t.promptfolio_theta,
            **{k: getattr(t, k) for k in PFEDMOAP_KEYS + FEDOTP_KEYS},
            "text_dim": text_dim(backbone),
        },
    )


def vision_shape(cfg: Config, backbone: OpenClipBackbone) -> tuple[int, int, int] | None:
    """``(depth, tokens, width)`` of one vision prompt set on this backbone (None: its image tower is no ViT)."""
    from pfpl.backbones.vision_tower import supports

    visual = backbone.model.visual
    if not supports(visual):
        return None
    return (cfg.prompt.vision_depth, cfg.prompt.vision_tokens, int(visual.class_embedding.shape[-1]))


FEDOTP_KEYS = ("fedotp_mass", "fedotp_eps", "fedotp_iterations", "fedotp_tolerance")
PFEDMOAP_KEYS = (
    "pfedmoap_experts",
    "pfedmoap_selection",
    "pfedmoap_lambda",
    "pfedmoap_gating_dim",
    "pfedmoap_heads",
    "pfedmoap_scaling",
)


def text_dim(backbone: OpenClipBackbone) -> int:
    """The width E of the backbone's class text features (FedTPG's and pFedMoAP's shapes depend on it)."""
    projection = backbone.text.text_projection
    if isinstance(projection, torch.nn.Linear):
        return int(projection.out_features)
    if projection is not None:
        return int(projection.shape[1])
    return int(backbone.ctx_dim)


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
