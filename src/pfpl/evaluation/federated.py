"""Personalised evaluation (DP-FPL's protocol, DESIGN §1), over the full label space.

*local*: a client's prompt on test data drawn like its own training data (for a pathological split:
all test images of its classes). *neighbor*: the same prompt on the test images of the classes the
other clients hold and it does not, i.e. how much generalisation to unseen classes it keeps.
Where clients see only some domains (styles), two more: *neighbor_same_domain* — the other clients'
classes in the client's own domains — and *cross_domain* — the client's own classes in the domains
it never saw. All are reported as mean and standard deviation over clients (``None`` when no client
has such test images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pfpl.data.features import Features
from pfpl.data.partitions import Partition, client_test_sets


@dataclass
class EvalPlan:
    """Which test samples (and weights) each client is scored on."""

    local: list[tuple[torch.Tensor, torch.Tensor]]
    neighbor: list[torch.Tensor]
    neighbor_same_domain: list[torch.Tensor] | None = None
    cross_domain: list[torch.Tensor] | None = None

    @classmethod
    def build(cls, partition: Partition, train: Features, test: Features) -> EvalPlan:
        tr_l, tr_d = train.labels.numpy(), train.domains.numpy()
        te_l, te_d = test.labels.numpy(), test.domains.numpy()
        local = [
            (torch.as_tensor(ix), torch.as_tensor(w, dtype=torch.float32))
            for ix, w in client_test_sets(partition, tr_l, tr_d, te_l, te_d)
        ]
        classes = [set(c.tolist()) for c in partition.client_classes(tr_l)]
        domains = [set(d.tolist()) for d in partition.client_domains(tr_d)]
        all_domains = set(np.unique(te_d).tolist())
        neighbor, same, cross = [], [], []
        for i, own in enumerate(classes):
            others = sorted(set().union(*(c for j, c in enumerate(classes) if j != i)) - own)
            seen = sorted(domains[i])
            neighbor.append(torch.as_tensor(np.flatnonzero(np.isin(te_l, others))))
            same.append(torch.as_tensor(np.flatnonzero(np.isin(te_l, others) & np.isin(te_d, seen))))
            unseen = sorted(all_domains - domains[i])
            cross.append(torch.as_tensor(np.flatnonzero(np.isin(te_l, sorted(own)) & np.isin(te_d, unseen))))
        skewed = any(domains[i] != all_domains for i in range(len(domains)))
        return cls(local, neighbor, same if skewed else None, cross if skewed else None)


def _accuracy(test: Features, text: torch.Tensor, index: torch.Tensor) -> float:
    if len(index) == 0:
        return float("nan")
    return float(((test.features[index] @ text.t()).argmax(-1) == test.labels[index]).float().mean())


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if not np.isnan(v)])
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else x


@torch.no_grad()
def client_scores(text_features: torch.Tensor, clients: list[int], test: Features, plan: EvalPlan) -> dict:
    """Each of ``clients``' accuracies (NaN where a client has no such test images) for their class
    text features ``[B, C, E]`` (or ``[C, E]`` shared): what a node computes for its own clients."""
    device = test.features.device
    text_features = text_features.to(device)
    if text_features.dim() == 2:
        text_features = text_features.expand(len(clients), *text_features.shape)
    local = []
    for row, i in enumerate(clients):
        idx, w = plan.local[i][0].to(device), plan.local[i][1].to(device)
        pred = (test.features[idx] @ text_features[row].t()).argmax(-1)
        local.append(float(((pred == test.labels[idx]).float() * w).sum() / w.sum()))
    per_client = {"local": local}
    sets = {
        "neighbor": plan.neighbor,
        "neighbor_same_domain": plan.neighbor_same_domain,
        "cross_domain": plan.cross_domain,
    }
    for key, index in sets.items():
        if index is not None:
            per_client[key] = [
                _accuracy(test, text_features[row], index[i].to(device)) for row, i in enumerate(clients)
            ]
    return per_client


def summarize(per_client: dict[str, list[float]]) -> dict:
    """Mean and std over clients of every score (NaN scores left out), with the per-client lists."""
    out: dict = {}
    for key, values in per_client.items():
        mean, std = _mean_std(values)
        out[key], out[f"{key}_std"] = _none_if_nan(mean), _none_if_nan(std)
    out["per_client"] = {k: [_none_if_nan(v) for v in vals] for k, vals in per_client.items()}
    return out


def evaluate_clients(text_features: torch.Tensor, test: Features, plan: EvalPlan) -> dict:
    """Accuracies per client, and their mean and std, for class text features ``[N, C, E]`` (or
    ``[C, E]`` shared by all clients)."""
    return summarize(client_scores(text_features, list(range(len(plan.local))), test, plan))
