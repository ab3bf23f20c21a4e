"""Personalised evaluation (DP-FPL's protocol, DESIGN §1), over the full label space.

*local*: a client's prompt on test data drawn like its own training data (for a pathological split:
all test images of its classes). *neighbor*: the same prompt on the test images of the classes the
other clients hold and it does not, i.e. how much generalisation to unseen classes it keeps.
Both are reported as mean and standard deviation over clients.
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

    @classmethod
    def build(cls, partition: Partition, train: Features, test: Features) -> EvalPlan:
        tr_l, tr_d = train.labels.numpy(), train.domains.numpy()
        te_l, te_d = test.labels.numpy(), test.domains.numpy()
        local = [
            (torch.as_tensor(ix), torch.as_tensor(w, dtype=torch.float32))
            for ix, w in client_test_sets(partition, tr_l, tr_d, te_l, te_d)
        ]
        classes = [set(c.tolist()) for c in partition.client_classes(tr_l)]
        neighbor = []
        for i, own in enumerate(classes):
            others = set().union(*(c for j, c in enumerate(classes) if j != i)) - own
            neighbor.append(torch.as_tensor(np.flatnonzero(np.isin(te_l, sorted(others)))))
        return cls(local, neighbor)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if not np.isnan(v)])
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


@torch.no_grad()
def evaluate_clients(text_features: torch.Tensor, test: Features, plan: EvalPlan) -> dict:
    """Local and neighbor accuracy per client for class text features ``[N, C, E]`` (or ``[C, E]``
    shared by all clients)."""
    n = len(plan.local)
    device = test.features.device
    text_features = text_features.to(device)
    if text_features.dim() == 2:
        text_features = text_features.expand(n, *text_features.shape)
    local, neighbor = [], []
    for i in range(n):
        idx, w = plan.local[i][0].to(device), plan.local[i][1].to(device)
        pred = (test.features[idx] @ text_features[i].t()).argmax(-1)
        local.append(float(((pred == test.labels[idx]).float() * w).sum() / w.sum()))
        nidx = plan.neighbor[i].to(device)
        if len(nidx):
            npred = (test.features[nidx] @ text_features[i].t()).argmax(-1)
            neighbor.append(float((npred == test.labels[nidx]).float().mean()))
        else:
            neighbor.append(float("nan"))
    lm, ls = _mean_std(local)
    nm, ns = _mean_std(neighbor)
    return {
        "local": lm,
        "local_std": ls,
        "neighbor": nm,
        "neighbor_std": ns,
        "per_client": {"local": local, "neighbor": neighbor},
    }
