"""Personalised evaluation (DP-FPL's protocol, DESIGN §1), over the full label space, and the field's
base-to-novel protocol beside it.

*local*: a client's prompt on test data drawn like its own training data (for a pathological split:
all test images of its classes). *neighbor*: the same prompt on the test images of the classes the
other clients hold and it does not, i.e. how much generalisation to unseen classes it keeps.
Where clients see only some domains (styles), two more: *neighbor_same_domain* — the other clients'
classes in the client's own domains — and *cross_domain* — the client's own classes in the domains
it never saw. All are reported as mean and standard deviation over clients (``None`` when no client
has such test images).

Base-to-novel (``evaluation.novel_fraction``; FedTPG's, FedPGP's protocol): *base* — the client's
prompt on the test images of every class some client trained on, classified among those classes;
*novel* — on the test images of the classes no client (nor FedSP's server) ever trained on,
classified among those classes; *hm* — the harmonic mean of the mean local, base and novel
accuracies. Leave-one-domain-out (``evaluation.held_out_domain``): *held_out_domain* — the client's
prompt on the held-out domain's test images of every class, over the full label space. Every score
is a function of the class text features alone, so it applies to any method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pfpl.data.features import Features
from pfpl.data.partitions import Partition, client_test_sets


@dataclass
class Split:
    """A test set scored the same way for every client: its samples and the label space it is
    classified in (``None``: every class)."""

    index: torch.Tensor
    classes: torch.Tensor | None = None


@dataclass
class EvalPlan:
    """Which test samples (and weights) each client is scored on."""

    local: list[tuple[torch.Tensor, torch.Tensor]]
    neighbor: list[torch.Tensor]
    neighbor_same_domain: list[torch.Tensor] | None = None
    cross_domain: list[torch.Tensor] | None = None
    #: base / novel / held_out_domain: one test set for every client
    shared: dict[str, Split] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        partition: Partition,
        train: Features,
        test: Features,
        novel: np.ndarray | None = None,
        held_out_domains: np.ndarray | None = None,
    ) -> EvalPlan:
        """``novel``: the classes held out of all training (base-to-novel); ``held_out_domains``: the
        domains held out of all training (leave-one-domain-out)."""
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
        shared: dict[str, Split] = {}
        if novel is not None and len(novel):
            base = np.asarray(sorted(set().union(*classes)), dtype=np.int64)
            if np.isin(base, novel).any():
                raise ValueError("a novel class is in some client's training data")
            novel = np.asarray(novel, dtype=np.int64)
            for key, space in (("base", base), ("novel", novel)):
                shared[key] = Split(torch.as_tensor(np.flatnonzero(np.isin(te_l, space))), torch.as_tensor(space))
        if held_out_domains is not None and len(held_out_domains):
            shared["held_out_domain"] = Split(torch.as_tensor(np.flatnonzero(np.isin(te_d, held_out_domains))))
        return cls(local, neighbor, same if skewed else None, cross if skewed else None, shared)


def _accuracy(test: Features, text: torch.Tensor, index: torch.Tensor, classes: torch.Tensor | None = None) -> float:
    """Accuracy on ``index``, classified among ``classes`` (``None``: every class)."""
    if len(index) == 0:
        return float("nan")
    logits = _scores(text, test, index)
    if classes is None:
        pred = logits.argmax(-1)
    else:
        classes = classes.to(logits.device)
        pred = classes[logits[:, classes].argmax(-1)]
    return float((pred == test.labels[index]).float().mean())


def _scores(text, test: Features, index: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` class scores of ``test``'s records ``index``: image features · class text features ``[C, E]``,
    or a released classifier's own (:class:`pfpl.algorithms.base.Classifier`: pFedMoAP, FedOTP)."""
    if hasattr(text, "scores"):
        return text.scores(test, index)
    return test.features[index] @ text.t()


def harmonic_mean(values: list[float]) -> float:
    """The harmonic mean (0 if any value is 0, NaN if any is NaN): the field's HM of local, base, novel."""
    arr = np.asarray(values, dtype=float)
    if np.isnan(arr).any():
        return float("nan")
    if (arr <= 0).any():
        return 0.0
    return float(len(arr) / (1.0 / arr).sum())


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
        pred = _scores(text_features[row], test, idx).argmax(-1)
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
    for key, split in plan.shared.items():
        index = split.index.to(device)
        per_client[key] = [_accuracy(test, text_features[row], index, split.classes) for row in range(len(clients))]
    return per_client


def summarize(per_client: dict[str, list[float]]) -> dict:
    """Mean and std over clients of every score (NaN scores left out), with the per-client lists; with
    base and novel scores, ``hm``: the harmonic mean of the mean local, base and novel accuracies (the
    field's figure; ``hm_std`` is None, the per-client list holds each client's own HM)."""
    out: dict = {}
    for key, values in per_client.items():
        mean, std = _mean_std(values)
        out[key], out[f"{key}_std"] = _none_if_nan(mean), _none_if_nan(std)
    lists = {k: [_none_if_nan(v) for v in vals] for k, vals in per_client.items()}
    if "base" in per_client and "novel" in per_client:
        keys = ("local", "base", "novel")
        means = [np.nan if out[k] is None else out[k] for k in keys]
        out["hm"], out["hm_std"] = _none_if_nan(harmonic_mean(means)), None
        rows = zip(*(per_client[k] for k in keys))
        lists["hm"] = [_none_if_nan(harmonic_mean(list(r))) for r in rows]
    out["per_client"] = lists
    return out


def average_rounds(rounds: list[dict[str, list[float | None]]]) -> dict[str, list[float]]:
    """Per client, the mean of each score over several rounds' per-client lists (``None`` / NaN
    entries left out): DP-FPL's published metric averages the last 10 rounds."""
    out: dict[str, list[float]] = {}
    for key in rounds[-1]:
        if key == "hm":  # recomputed from the averaged scores
            continue
        values = np.array([[np.nan if v is None else v for v in r[key]] for r in rounds if key in r], dtype=float)
        with np.errstate(all="ignore"):
            counts = (~np.isnan(values)).sum(0)
            sums = np.nansum(values, 0)
        out[key] = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return out


def evaluate_clients(text_features: torch.Tensor, test: Features, plan: EvalPlan) -> dict:
    """Accuracies per client, and their mean and std, for class text features ``[N, C, E]`` (or
    ``[C, E]`` shared by all clients)."""
    return summarize(client_scores(text_features, list(range(len(plan.local))), test, plan))
