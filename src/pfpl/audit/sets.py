"""Who is audited against whom: one client's members, matched non-members and a disjoint shadow
pool (pair by pair of class and domain), and the stratified halves shadows train on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pfpl.data.features import Features


@dataclass
class AuditSets:
    """Indices of one target client's audit data: members into the train split, non-members into the
    held-out split, the shadow pool into the shadow split (which may be the held-out split itself;
    then the pool is drawn from what the non-members left)."""

    members: np.ndarray
    nonmembers: np.ndarray
    shadow_pool: np.ndarray
    dropped: int  # client records not audited: their (class, domain) pair has no held-out record left


def pair_keys(labels: Any, domains: Any, n_domains: int) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) * n_domains + np.asarray(domains, dtype=np.int64)


def matched_sets(
    client_index: Any,
    train: Features,
    heldout: Features,
    shadow: Features | None = None,
    *,
    max_members: int | None = None,
    seed: int = 0,
) -> AuditSets:
    """Members, matched non-members and a disjoint shadow pool for one client.

    ``max_members`` first draws a random subset of the client's records. For every (class, domain)
    pair with k member candidates and h held-out records, min(k, h) of each are kept, so members and
    non-members have identical class and domain counts; up to 2·min(k, h) records of the pair form
    the shadow pool (from ``shadow``, or from the held-out records the non-members did not use when
    ``shadow`` is None).
    """
    rng = np.random.default_rng(seed)
    cand = np.asarray(client_index, dtype=np.int64).reshape(-1)
    if max_members is not None and max_members < len(cand):
        cand = np.sort(rng.choice(cand, size=max_members, replace=False))
    n_dom = 1 + max(int(f.domains.max()) for f in (train, heldout, shadow) if f is not None and len(f))
    mkey = pair_keys(train.labels[cand].numpy(), train.domains[cand].numpy(), n_dom)
    hkey = pair_keys(heldout.labels.numpy(), heldout.domains.numpy(), n_dom)
    skey = pair_keys(shadow.labels.numpy(), shadow.domains.numpy(), n_dom) if shadow is not None else None
    members, nonmembers, pool = [], [], []
    for key in np.unique(mkey):
        mine = rng.permutation(cand[mkey == key])
        held = rng.permutation(np.flatnonzero(hkey == key))
        k = min(len(mine), len(held))
        members.append(mine[:k])
        nonmembers.append(held[:k])
        if skey is None:
            pool.append(held[k : k + 2 * k])
        else:
            pool.append(rng.permutation(np.flatnonzero(skey == key))[: 2 * k])
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    members, nonmembers, pool = cat(members), cat(nonmembers), cat(pool)
    return AuditSets(members, nonmembers, pool, dropped=len(cand) - len(members))


def half_splits(keys: np.ndarray, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_models, n]`` boolean training membership: stratified random halves in complementary pairs.

    Models 2j and 2j+1 split every group of equal ``keys`` between them (odd groups give the extra
    record to either at random), so every record is "in" for exactly half of each pair; an odd last
    model takes a fresh random half."""
    keys = np.asarray(keys)
    out = np.zeros((n_models, len(keys)), dtype=bool)
    for j in range(0, n_models, 2):
        first = np.zeros(len(keys), dtype=bool)
        for key in np.unique(keys):
            idx = rng.permutation(np.flatnonzero(keys == key))
            take = len(idx) // 2 + (len(idx) % 2 and rng.random() < 0.5)
            first[idx[:take]] = True
        out[j] = first
        if j + 1 < n_models:
            out[j + 1] = ~first
    return out
