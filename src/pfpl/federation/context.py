"""The run context every method of a run shares (:class:`Benchmark`): the backbone, the cached image
features, the partition, the evaluation plans, the prompt tower, FedSP's auxiliary model and the
clip each method measures on the val split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from pfpl.algorithms import get_method, spec
from pfpl.backbones import PromptTower, load_backbone
from pfpl.config import Config
from pfpl.data import build_dataset
from pfpl.data.clients import ClientData
from pfpl.data.features import Features, image_features
from pfpl.data.partitions import make_partition, novel_classes, training_pool
from pfpl.errors import ConfigError
from pfpl.evaluation.federated import EvalPlan, client_scores, summarize
from pfpl.evaluation.zeroshot import zero_shot_text_features
from pfpl.federation.simulator import Simulator
from pfpl.federation.vision import build_vision, split_tokens, vision_methods, vision_scores
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
        labels, domains = self.train.labels.numpy(), self.train.domains.numpy()
        #: base-to-novel and leave-one-domain-out: what no party trains on (the split is the data's)
        self.novel = novel_classes(labels, cfg.evaluation.novel_fraction, cfg.seed)
        self.held_out_domains = held_out_domain_ids(self.dataset.domainnames, cfg.evaluation.held_out_domain)
        pool = training_pool(labels, domains, self.novel, self.held_out_domains)
        self.server_index: np.ndarray | None = None
        if any(spec(m).auxiliary for m in cfg.train.methods) and cfg.fedsp.server_data == "shard":
            self.server_index = np.intersect1d(server_shard(self.train, cfg.fedsp.server_fraction, cfg.seed), pool)
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
        self._patches: dict[str, torch.Tensor] = {}  # FedOTP: each split's patch features, loaded once
        self.plan = EvalPlan.build(self.partition, self.train, self.test, self.novel, self.held_out_domains)
        self.tower = PromptTower(
            self.backbone,
            self.dataset.classnames,
            cfg.prompt.n_ctx,
            max_sequences=cfg.train.max_sequences,
            share_prefix=cfg.train.share_prefix,
        )
        self.reference = zero_shot_text_features(self.backbone, self.dataset.classnames, cfg.prompt.template)
        #: vision prompts: the prompted image tower and each split's cached prompt-free tokens
        self.vision = build_vision(cfg, self.backbone) if vision_methods(cfg) else None
        self.tower.vision = self.vision
        self._tokens: dict[str, torch.Tensor] = {}

    def counts_table(self) -> list[dict]:
        return self.partition.counts_table(
            self.train.labels.numpy(), self.train.domains.numpy(), self.dataset.classnames, self.dataset.domainnames
        )

    def client_data(self) -> ClientData:
        tokens = self.tokens("train") if self.vision is not None else None
        return ClientData(self.train, self.partition.clients, self.device, tokens=tokens)

    def method_data(self, method_name: str) -> ClientData:
        """Every client's training data as method ``method_name`` trains on it: FedOTP's batches carry
        their records' patch features, a run with vision prompts its prompt-free tokens. The simulator's
        engine and a SuperNode's host both take it from here, so both transports train on the same
        batches (FedSP trains on its auxiliary model's features instead: :mod:`pfpl.federation.fedsp`)."""
        if spec(method_name).patches:
            return ClientData(self.train, self.partition.clients, self.device, tokens=self.patches("train"))
        return self.client_data()

    def tokens(self, split: str) -> torch.Tensor:
        """``[N, T, W]`` a split's prompt-free image tokens (runs with vision prompts), cached on disk."""
        if split not in self._tokens:
            self._tokens[split] = split_tokens(self.vision, self.backbone, self.dataset, split, self.cfg.cache_dir).to(
                self.device
            )
        return self._tokens[split]

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
        data = self.method_data(method_name)
        return build_engine(cfg, method_name, self.tower, data, self.backbone.logit_scale, self.reference)

    def patches(self, split: str) -> torch.Tensor:
        """``[N, P, E]`` a split's patch features (FedOTP), cached on disk beside the pooled ones
        (:class:`~pfpl.backbones.patches.PatchEncoder`: P·E floats per image instead of E)."""
        if split not in self._patches:
            from pfpl.backbones.patches import PatchEncoder

            flat = image_features(PatchEncoder(self.backbone), self.dataset, split, self.cfg.cache_dir).features
            e = self.test.features.shape[-1]
            self._patches[split] = flat.view(flat.shape[0], -1, e).to(self.device)
        return self._patches[split]

    @property
    def val_plan(self) -> EvalPlan:
        """Which val records each client is scored on (built once, where hyper-parameters are chosen)."""
        if self._val_plan is None:
            self._val_plan = EvalPlan.build(self.partition, self.train, self.val, self.novel, self.held_out_domains)
        return self._val_plan

    def scores(
        self,
        text_features,
        clients: list[int] | None = None,
        vision: torch.Tensor | None = None,
        split: str = "test",
    ) -> dict[str, list[float]]:
        """Each of ``clients``' (default: every client's) accuracies on ``split`` (``"test"`` or ``"val"``),
        from its row of the class text features or released classifier and, if the method prompts the
        image tower, of its vision prompts ``[B, depth, P, W]`` — with patch features where the
        classifier scores by them (FedOTP). The one scoring of both transports: the simulator's
        evaluation (every client) and a SuperNode's (the clients it hosts), so they cannot drift."""
        features, plan = (self.test, self.plan) if split == "test" else (self.val, self.val_plan)
        clients = list(range(len(plan.local))) if clients is None else list(clients)
        if vision is not None:
            return vision_scores(text_features, vision, clients, features, self.tokens(split), plan, self.vision)
        if getattr(text_features, "needs_tokens", False):
            features = replace(features, tokens=self.patches(split))
        return client_scores(text_features, clients, features, plan)

    def evaluate(self, text_features: torch.Tensor, vision: torch.Tensor | None = None) -> dict:
        """Test accuracies of every client's class text features (and vision prompts, if any)."""
        return summarize(self.scores(text_features, vision=vision))

    def validate(
        self, method_name: str, text_features: torch.Tensor, vision: torch.Tensor | None = None
    ) -> dict | None:
        """Mean local / neighbor accuracy on the val split, where hyper-parameters are chosen (never on
        test); None when the method's server trained on val (FedSP with ``fedsp.server_data = 'val'``)."""
        if spec(method_name).auxiliary and self.cfg.fedsp.server_data == "val":
            return None
        result = summarize(self.scores(text_features, vision=vision, split="val"))
        return {k: result[k] for k in ("local", "neighbor") if k in result}


def held_out_domain_ids(domainnames: list[str], name: str | None) -> np.ndarray:
    """The id of ``evaluation.held_out_domain`` among the dataset's domains (none: empty)."""
    if name is None:
        return np.empty(0, np.int64)
    if name not in domainnames:
        raise ConfigError(
            f"config error: evaluation.held_out_domain = {name!r} is not a domain of this dataset; "
            f"its domains: {', '.join(domainnames)}"
        )
    if len(domainnames) < 2:
        raise ConfigError("config error: evaluation.held_out_domain needs a dataset with at least two domains")
    return np.asarray([domainnames.index(name)], dtype=np.int64)


def server_shard(train: Features, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of every (class, domain) pair of the training split, for the server."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E4F]))
    keys = train.labels.numpy() * (int(train.domains.max()) + 1) + train.domains.numpy()
    out = []
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        out.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(out))
