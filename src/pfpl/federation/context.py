"""The run context every method of a run shares (:class:`Benchmark`): the backbone, the cached image
features, the partition, the evaluation plans, the prompt tower, FedSP's auxiliary model and the
clip each method measures on the val split."""

from __future__ import annotations

import numpy as np
import torch

from pfpl.algorithms import get_method, spec
from pfpl.backbones import PromptTower, load_backbone
from pfpl.config import Config
from pfpl.data import build_dataset
from pfpl.data.clients import ClientData
from pfpl.data.features import Features, image_features
from pfpl.data.partitions import make_partition
from pfpl.evaluation.federated import EvalPlan, evaluate_clients
from pfpl.evaluation.zeroshot import zero_shot_text_features
from pfpl.federation.simulator import Simulator
from pfpl.federation.wiring import build_engine, method_settings, plan_for, train_settings
from pfpl.privacy.clipping import quantile_clip, record_gradient_norms
from pfpl.privacy.modes import mode_of
from pfpl.privacy.plan import PrivacyPlan


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
        if any(spec(m).auxiliary for m in cfg.train.methods) and cfg.fedsp.server_data == "shard":
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
        if spec(method_name).auxiliary:
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
        if spec(method_name).auxiliary and self.cfg.fedsp.server_data == "val":
            return None
        if self._val_plan is None:
            self._val_plan = EvalPlan.build(self.partition, self.train, self.val)
        result = evaluate_clients(text_features, self.val, self._val_plan)
        return {k: result[k] for k in ("local", "neighbor") if k in result}


def server_shard(train: Features, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of every (class, domain) pair of the training split, for the server."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E4F]))
    keys = train.labels.numpy() * (int(train.domains.max()) + 1) + train.domains.numpy()
    out = []
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        out.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(out))
