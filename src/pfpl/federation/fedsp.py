"""What a FedSP run needs besides the shared benchmark (DESIGN §8): the auxiliary model, distilled by
the server on its own data before round 1, the clients' image features under it (its image tower is
frozen after distillation, so they are computed once and cached like the full model's), the
server's data for fine-tuning, and the measurements a model owner wants: how much of the model a
client holds, and how well the auxiliary model alone does (zero-shot, linear probe) before and
after distillation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pfpl.backbones import OpenClipBackbone, PromptTower
from pfpl.backbones.auxiliary import auxiliary_backbone, parameter_report, text_body
from pfpl.backbones.distill import distill
from pfpl.data.clients import ClientData
from pfpl.data.features import Features, image_features
from pfpl.evaluation.probe import linear_probe
from pfpl.evaluation.zeroshot import zero_shot
from pfpl.privacy.modes import is_private


@dataclass
class FedSPContext:
    aux: OpenClipBackbone
    tower: PromptTower  # the clients' prompt tower (auxiliary model)
    train: Features  # training split under the auxiliary image tower
    test: Features
    server_data: tuple[torch.Tensor, torch.Tensor]  # the server's own data under the full model
    body: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)

    def client_data(self, clients) -> ClientData:
        return ClientData(self.train, clients, self.aux.device)


def server_split(bench) -> tuple[Features, list[str], torch.Tensor]:
    """The server's own data: (full-model features, texts for distillation, preprocessed images)."""
    cfg = bench.cfg
    if cfg.fedsp.server_data == "val":
        split, index = "val", None
    else:
        split, index = "train", bench.server_index
    data = bench.dataset.split(split)
    rows = np.arange(len(data)) if index is None else np.asarray(index)
    rows = server_rows(bench, split, rows)
    images = torch.stack([bench.backbone.preprocess(data.load(int(i))) for i in rows])
    feats = image_features(bench.backbone, bench.dataset, split, cfg.cache_dir).subset(rows)
    captions = bench.dataset.captions(split)
    texts = [cfg.prompt.template.format(c) for c in bench.dataset.classnames]
    texts += [captions[int(i)] for i in rows] if captions else []
    return feats, texts, images


def server_rows(bench, split: str, rows: np.ndarray) -> np.ndarray:
    """The server's rows of ``split``: none of a held-out (novel) class or domain — nobody trains on
    those — and, with ``fedsp.server_per_class``, at most that many per class (a seeded draw)."""
    feats = image_features(bench.backbone, bench.dataset, split, bench.cfg.cache_dir)
    labels, domains = feats.labels.numpy()[rows], feats.domains.numpy()[rows]
    keep = ~np.isin(labels, bench.novel) & ~np.isin(domains, bench.held_out_domains)
    rows, labels = rows[keep], labels[keep]
    cap = bench.cfg.fedsp.server_per_class
    if cap is not None:
        rng = np.random.default_rng(np.random.SeedSequence([bench.cfg.seed, 0x5E4C]))
        rows = np.sort(np.concatenate([rng.permutation(rows[labels == c])[:cap] for c in np.unique(labels)]))
    if len(rows) == 0:
        raise ValueError("FedSP's server has no labelled images left after the held-out classes and domains")
    return rows


def build_context(bench, distilled: bool, log=None) -> FedSPContext:
    cfg = bench.cfg
    aux = auxiliary_backbone(bench.backbone, cfg.fedsp.auxiliary, cfg.fedsp.layers)
    server, texts, images = server_split(bench)
    names, domains = bench.dataset.classnames, bench.dataset.domainnames

    def quality(model: OpenClipBackbone) -> dict:
        test = image_features(model, bench.dataset, "test", cfg.cache_dir)
        zs = zero_shot(model, test, names, domains, cfg.prompt.template)
        if is_private(cfg.dp):  # a probe fitted on the clients' training records: no mechanism covers it
            return {"zero_shot": zs["accuracy"], "linear_probe": None}
        train = image_features(model, bench.dataset, "train", cfg.cache_dir)
        probe = linear_probe(train, image_features(model, bench.dataset, "val", cfg.cache_dir), test, len(names))
        return {"zero_shot": zs["accuracy"], "linear_probe": probe["accuracy"]}

    report = {
        "parameters": parameter_report(bench.backbone, aux),
        "full": quality(bench.backbone),
        "auxiliary_before": quality(aux),
        "distilled": distilled,
        "server_data": cfg.fedsp.server_data,
        "server_images": len(images),
    }
    if distilled and cfg.fedsp.distill_steps > 0:
        report["distillation"] = distill(
            aux, bench.backbone, images, texts, cfg.fedsp.distill_steps, cfg.fedsp.distill_lr, seed=cfg.seed, log=log
        )
        aux = OpenClipBackbone(aux.model, aux.name + ":distilled", aux.preprocess, aux.tokenizer, str(aux.device))
    report["auxiliary_after"] = quality(aux)
    start = time.perf_counter()
    train = image_features(aux, bench.dataset, "train", cfg.cache_dir)
    test = image_features(aux, bench.dataset, "test", cfg.cache_dir).to(aux.device)
    report["auxiliary_feature_seconds"] = round(time.perf_counter() - start, 1)
    tower = PromptTower(
        aux, names, cfg.prompt.n_ctx, max_sequences=cfg.train.max_sequences, share_prefix=cfg.train.share_prefix
    )
    server_data = (server.features.to(bench.device), server.labels.to(bench.device))
    return FedSPContext(aux, tower, train, test, server_data, text_body(aux), report)


def method_extra(context: FedSPContext, bench) -> dict:
    """What FedSP's method object needs at construction (the settings' ``extra``)."""
    f = bench.cfg.fedsp
    return {
        "fedsp_body": context.body,
        "fedsp_full_tower": bench.tower,
        "fedsp_server_data": context.server_data,
        "fedsp_server_steps": f.server_steps,
        "fedsp_server_lr": f.server_lr,
        "fedsp_upload": f.upload,
        "fedsp_scale": bench.backbone.logit_scale,
    }
