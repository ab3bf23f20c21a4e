"""Shadow training: every shadow repeats how the target client trained its part of the released
prompt (its method, hyper-parameters and DP mechanism), with the released shared prompt fixed, by
the run's own engine factory; all shadows of one audit are the clients of one simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import Method, MethodSettings, Param, Scope
from pfpl.config import Config
from pfpl.data.clients import ClientData
from pfpl.data.features import Features
from pfpl.errors import AuditError
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator
from pfpl.privacy.modes import mode_of
from pfpl.privacy.plan import PrivacyPlan


@dataclass
class ShadowTraining:
    """How the target client trained its part of the released prompt; shadows repeat it."""

    method: str
    engine: TrainSettings  # the target run's settings, with ``local_steps`` resolved (not 0)
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    config: Config | None = None  # the run's config (its ``dp`` section drives the shadows' DP)
    noise_multiplier: float | None = None  # σ the run used (feature / per-sample); None: calibrate from dp
    # the shared parameters the targets received, one row per group of targets ([G, ...])
    released: dict[str, torch.Tensor] = field(default_factory=dict)
    global_weight: float = 1.0  # the target client's share n_i / Σn of the global aggregate


@dataclass
class AuditTarget:
    """One client's released prompt and its audit records."""

    client: int
    context: torch.Tensor  # [M, D] the released context
    members: Features
    nonmembers: Features
    shadow_pool: Features | None = None
    accountant_epsilon: float = math.inf
    dropped: int = 0
    group: int = 0  # its row of ``ShadowTraining.released``


class PersonalCopy(Method):
    """A global-only method's parameters as per-shadow copies, initialised to the released values."""

    def __init__(self, base: Method, released: dict[str, torch.Tensor]):
        super().__init__(base.settings)
        self.base, self.released = base, {k: released[k] for k in base.shared_params}
        self.name = base.name
        self.params = tuple(Param(p.name, Scope.LOCAL, p.private) for p in base.params)
        self.leaf_params = base.leaf_params

    def init_shared(self, n_ctx, dim, gen):
        return {}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {k: v.detach().clone() for k, v in self.released.items()}

    def views(self, params, gens):
        return self.base.views(params, gens)

    def param_grads(self, views, leaf_grads):
        return self.base.param_grads(views, leaf_grads)

    def extra_loss(self, views, text_features, tower, reference):
        return self.base.extra_loss(views, text_features, tower, reference)


def _shadow_config(cfg: Config | None, sigma: float | None) -> Config:
    """The run's config with σ fixed to what the run used (shadows replicate the mechanism, not the target ε)."""
    cfg = cfg or Config()
    dp = cfg.dp
    if mode_of(dp).formal and sigma is not None:
        dp = dp.model_copy(update={"target_epsilon": None, "noise_multiplier": float(sigma)})
    return cfg.model_copy(update={"dp": dp})


def shadow_simulator(
    training: ShadowTraining,
    tower,
    data: Features,
    clients: list[np.ndarray],
    scale: float,
    reference: torch.Tensor | None,
    seed: int,
    groups: list[int] | None = None,
) -> tuple[Simulator, PrivacyPlan]:
    """One simulator whose clients are shadows: fresh personal parts on the fixed released shared
    prompt of their target's group (``groups``: one row of ``training.released`` per shadow);
    returns it with its privacy plan. Server phases (re-clustering, server fine-tuning) do not run:
    the shadows only repeat the target client's own training."""
    from pfpl.federation.wiring import build_engine

    base = get_method(training.method)(training.method_settings)
    lr = training.engine.lr
    missing = [k for k in base.shared_params if k not in training.released]
    if missing:
        raise AuditError(f"method {training.method!r}: the released parameters lack {missing[0]!r}")
    n_groups = len(next(iter(training.released.values()))) if training.released else 1
    groups = [0] * len(clients) if groups is None else list(groups)
    if len(groups) != len(clients) or (groups and not 0 <= min(groups) <= max(groups) < n_groups):
        raise AuditError(f"shadow groups must be {len(clients)} indices below {n_groups}")
    if base.shared_params and not base.local_params:
        if n_groups != 1:
            raise AuditError(f"method {training.method!r}: a global-only method releases one shared prompt")
        method: Method = PersonalCopy(base, {k: v[0] for k, v in training.released.items()})
        lr = lr * training.global_weight
    else:
        method = base
    engine = replace(training.engine, participation=1.0, lr=lr, seed=seed, train_shared=False)
    if training.config is None or not mode_of(training.config.dp).noises:
        engine = replace(engine, sampling="shuffle")
    cfg = _shadow_config(training.config, training.noise_multiplier)
    sim, plan = build_engine(
        cfg,
        training.method,
        tower,
        ClientData(data, clients, tower.backbone.device),
        scale,
        reference,
        settings=engine,
        method=method,
    )
    sim.phases = []
    if method.shared_params:
        sim.server.n_groups = n_groups
        sim.server.groups = torch.as_tensor(groups, dtype=torch.long, device=sim.server.groups.device)
    for name in method.shared_params:
        sim.server.shared[name] = training.released[name].detach().clone().to(sim.device)
    return sim, plan
