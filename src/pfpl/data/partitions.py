"""Split a labelled train split among federated clients.

Every scheme is a pure function of (labels, domains, n_clients, seed, parameters), so a run can be
rebuilt from its config alone. Schemes:

- ``iid``: a seeded shuffle split as evenly as possible.
- ``pathological``: DP-FPL's protocol; shuffled class ids split into ``n_clients`` groups
  (``np.array_split`` sizes), each client owns *all* train samples of its classes (label skew).
- ``dirichlet``: per-class Dirichlet(alpha) shares over clients, redrawn until every client has at
  least ``min_size`` samples (label skew of tunable strength; alpha=0.3 is DP-FPL's CIFAR setup).
- ``domain``: one domain (style) per client, domains dealt round-robin over a seeded permutation;
  clients sharing a domain split it iid (domain skew).
- ``domain_class``: ``domain`` plus a class subset per client (domain and label skew together).

Only classes/domains that occur in ``labels``/``domains`` are dealt out. Every scheme except
``dirichlet`` (which honours ``min_size``) only guarantees that no client is empty; an empty client
is an error, never a silent outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pfpl.errors import PartitionError

SCHEMES = ("iid", "pathological", "dirichlet", "domain", "domain_class")
DIRICHLET_RETRIES = 100


@dataclass
class Partition:
    """Disjoint, sorted int64 index arrays into the train split, one per client."""

    clients: list[np.ndarray]
    scheme: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def sizes(self) -> list[int]:
        return [int(len(ix)) for ix in self.clients]

    def client_classes(self, labels: np.ndarray) -> list[np.ndarray]:
        """Sorted class ids present in each client's data."""
        labels = np.asarray(labels)
        return [np.unique(labels[ix]).astype(np.int64) for ix in self.clients]

    def client_domains(self, domains: np.ndarray) -> list[np.ndarray]:
        """Sorted domain ids present in each client's data."""
        domains = np.asarray(domains)
        return [np.unique(domains[ix]).astype(np.int64) for ix in self.clients]

    def counts_table(
        self, labels: np.ndarray, domains: np.ndarray, classnames: Sequence[str], domainnames: Sequence[str]
    ) -> list[dict]:
        """Per-client sample counts by class and domain (nonzero only), JSON-serialisable for runs."""
        labels, domains = _check_labels(labels, domains)
        if len(labels) and labels.max() >= len(classnames):
            raise PartitionError(f"class id {int(labels.max())} has no name; {len(classnames)} classnames given")
        if len(domains) and domains.max() >= len(domainnames):
            raise PartitionError(f"domain id {int(domains.max())} has no name; {len(domainnames)} domainnames given")
        rows = []
        for i, ix in enumerate(self.clients):
            cls, ccount = np.unique(labels[ix], return_counts=True)
            dom, dcount = np.unique(domains[ix], return_counts=True)
            rows.append(
                {
                    "client": i,
                    "n": int(len(ix)),
                    "classes": {str(classnames[c]): int(k) for c, k in zip(cls.tolist(), ccount.tolist())},
                    "domains": {str(domainnames[d]): int(k) for d, k in zip(dom.tolist(), dcount.tolist())},
                }
            )
        return rows


def make_partition(
    labels: np.ndarray,
    domains: np.ndarray,
    n_clients: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.3,
    classes_per_client: int | None = None,
    min_size: int = 2,
) -> Partition:
    """Partition the train split described by ``labels``/``domains`` among ``n_clients`` clients.

    ``alpha`` and ``min_size`` are used by ``dirichlet``; ``classes_per_client`` by ``domain_class``
    for clients that are alone on their domain (default ``max(1, C // n_clients)``).
    """
    labels, domains = _check_labels(labels, domains)
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise PartitionError(f"n_clients={n_clients!r} must be an integer >= 1")
    n_clients = int(n_clients)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise PartitionError(f"seed={seed!r} must be an integer")
    try:
        alpha_ok = bool(np.isfinite(float(alpha)) and float(alpha) > 0)
    except (TypeError, ValueError):
        alpha_ok = False
    if not alpha_ok:
        raise PartitionError(f"alpha={alpha!r} must be a finite number > 0")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise PartitionError(f"min_size={min_size!r} must be an integer >= 0")
    if classes_per_client is not None and (
        isinstance(classes_per_client, bool)
        or not isinstance(classes_per_client, (int, np.integer))
        or classes_per_client < 1
    ):
        raise PartitionError(f"classes_per_client={classes_per_client!r} must be None or an integer >= 1")
    if len(labels) < n_clients:
        raise PartitionError(f"n_clients={n_clients} exceeds the {len(labels)} training samples")

    rng = np.random.default_rng(int(seed))
    if scheme == "iid":
        clients = np.array_split(rng.permutation(len(labels)), n_clients)
        params: dict[str, Any] = {}
    elif scheme == "pathological":
        clients = _pathological(rng, labels, n_clients)
        params = {}
    elif scheme == "dirichlet":
        clients = _dirichlet(rng, labels, n_clients, float(alpha), int(min_size))
        params = {"alpha": float(alpha), "min_size": int(min_size)}
    elif scheme == "domain":
        clients = _domain(rng, domains, n_clients)
        params = {}
    else:
        clients = _domain_class(rng, labels, domains, n_clients, classes_per_client)
        params = {"classes_per_client": None if classes_per_client is None else int(classes_per_client)}

    clients = [np.sort(np.asarray(ix, dtype=np.int64)) for ix in clients]
    for i, ix in enumerate(clients):
        if len(ix) == 0:
            raise PartitionError(
                f"scheme {scheme!r} left client {i} of {n_clients} with no samples; use fewer clients or another scheme"
            )
    return Partition(clients, scheme, {"seed": int(seed), "n_clients": n_clients, **params})


def novel_classes(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Base-to-novel: a seeded ``round(fraction · C)`` of the classes present in ``labels``, held out of
    every client's training data (sorted class ids; empty for ``fraction = 0``). At least one class
    stays on each side, else it is an error."""
    classes = np.unique(np.asarray(labels))
    if not 0 <= fraction < 1:
        raise PartitionError(f"novel_fraction={fraction!r} must be in [0, 1)")
    if fraction == 0:
        return np.empty(0, np.int64)
    k = int(round(fraction * len(classes)))
    if not 1 <= k < len(classes):
        raise PartitionError(
            f"novel_fraction={fraction:g} of {len(classes)} classes holds out {k}; at least one class must be "
            "novel and one base"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB2A5E]))
    return np.sort(rng.choice(classes, size=k, replace=False)).astype(np.int64)


def training_pool(
    labels: np.ndarray, domains: np.ndarray, held_classes: np.ndarray, held_domains: np.ndarray
) -> np.ndarray:
    """Indices of the records any party may train on: those of neither a held-out (novel) class nor a
    held-out domain. Empty is an error."""
    labels, domains = _check_labels(labels, domains)
    pool = np.flatnonzero(~np.isin(labels, held_classes) & ~np.isin(domains, held_domains)).astype(np.int64)
    if len(pool) == 0:
        raise PartitionError("holding out the novel classes and the held-out domain leaves no training records")
    return pool


def client_test_sets(
    partition: Partition,
    train_labels: np.ndarray,
    train_domains: np.ndarray,
    test_labels: np.ndarray,
    test_domains: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per client, test indices and weights that make the test set look like its training data.

    A test sample is kept if its (class, domain) pair occurs in the client's training data; its weight
    is the client's training frequency of that pair divided by the number of test samples of the
    pair, renormalised to sum to 1 (pairs the test split lacks drop out). A weighted accuracy is then
    the client's accuracy on data distributed like its own. A client none of whose pairs occur in the
    test split is an error.
    """
    train_labels, train_domains = _check_labels(train_labels, train_domains)
    test_labels, test_domains = _check_labels(test_labels, test_domains)
    n_dom = int(max(train_domains.max(initial=-1), test_domains.max(initial=-1))) + 1
    train_key = train_labels * n_dom + train_domains
    test_key = test_labels * n_dom + test_domains
    test_pairs, test_count = np.unique(test_key, return_counts=True)
    out = []
    for i, ix in enumerate(partition.clients):
        pairs, count = np.unique(train_key[ix], return_counts=True)
        freq = count / count.sum()
        keep = np.flatnonzero(np.isin(test_key, pairs))
        if len(keep) == 0:
            raise PartitionError(
                f"client {i} has no test samples of its (class, domain) pairs; "
                f"the test split must cover the training pairs"
            )
        k = test_key[keep]
        w = freq[np.searchsorted(pairs, k)] / test_count[np.searchsorted(test_pairs, k)]
        out.append((keep.astype(np.int64), w / w.sum()))
    return out


def _check_labels(labels, domains) -> tuple[np.ndarray, np.ndarray]:
    labels, domains = np.asarray(labels), np.asarray(domains)
    for name, a in (("labels", labels), ("domains", domains)):
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise PartitionError(f"{name} must be a 1-D integer array, got dtype {a.dtype} shape {a.shape}")
        if a.size and a.min() < 0:
            raise PartitionError(f"{name} must be >= 0, got {int(a.min())}")
    if labels.shape != domains.shape:
        raise PartitionError(f"labels {labels.shape} and domains {domains.shape} must have the same length")
    return labels.astype(np.int64), domains.astype(np.int64)


def _pathological(rng: np.random.Generator, labels: np.ndarray, n_clients: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    if n_clients > len(classes):
        raise PartitionError(
            f"pathological partition needs n_clients <= number of classes; "
            f"got n_clients={n_clients} > {len(classes)} classes"
        )
    groups = np.array_split(rng.permutation(classes), n_clients)
    return [np.flatnonzero(np.isin(labels, g)) for g in groups]


def _dirichlet(
    rng: np.random.Generator, labels: np.ndarray, n_clients: int, alpha: float, min_size: int
) -> list[np.ndarray]:
    if len(labels) < n_clients * min_size:
        raise PartitionError(
            f"dirichlet min_size={min_size} impossible: {len(labels)} samples < n_clients={n_clients} x min_size"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_RETRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        clients = [np.concatenate(p) for p in parts]
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise PartitionError(
        f"dirichlet alpha={alpha} gave some client fewer than min_size={min_size} samples "
        f"in {DIRICHLET_RETRIES} draws; raise alpha, lower min_size or use fewer clients"
    )


def _assign_domains(rng: np.random.Generator, domains: np.ndarray, n_clients: int) -> np.ndarray:
    """Client i's domain: round-robin over a seeded permutation of the domains present."""
    order = rng.permutation(np.unique(domains))
    return order[np.arange(n_clients) % len(order)]


def _domain(rng: np.random.Generator, domains: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """One domain per client; with n_clients < K domains, some domains go unused."""
    assigned = _assign_domains(rng, domains, n_clients)
    clients: list[np.ndarray] = [np.empty(0, np.int64)] * n_clients
    for d in np.unique(assigned):
        members = np.flatnonzero(assigned == d)
        for k, part in zip(members, np.array_split(rng.permutation(np.flatnonzero(domains == d)), len(members))):
            clients[k] = part
    return clients


def _domain_class(
    rng: np.random.Generator, labels: np.ndarray, domains: np.ndarray, n_clients: int, classes_per_client: int | None
) -> list[np.ndarray]:
    """One domain per client (as ``domain``) intersected with a class subset.

    Clients sharing a domain split that domain's classes pathologically; a client alone on its
    domain gets ``classes_per_client`` classes drawn at random (default ``max(1, C // n_clients)``).
    With n_clients < K domains, some domains go unused.
    """
    assigned = _assign_domains(rng, domains, n_clients)
    n_classes = len(np.unique(labels))
    k_single = max(1, n_classes // n_clients) if classes_per_client is None else int(classes_per_client)
    clients: list[np.ndarray] = [np.empty(0, np.int64)] * n_clients
    for d in np.unique(assigned):
        members = np.flatnonzero(assigned == d)
        in_dom = domains == d
        classes = np.unique(labels[in_dom])
        if len(members) == 1:
            if k_single > len(classes):
                raise PartitionError(
                    f"classes_per_client={k_single} exceeds the {len(classes)} classes of domain {int(d)}"
                )
            groups = [rng.choice(classes, size=k_single, replace=False)]
        else:
            if len(members) > len(classes):
                raise PartitionError(
                    f"domain_class: {len(members)} clients share domain {int(d)} "
                    f"but it has only {len(classes)} classes; use fewer clients"
                )
            groups = np.array_split(rng.permutation(classes), len(members))
        for k, g in zip(members, groups):
            clients[k] = np.flatnonzero(in_dom & np.isin(labels, g))
    return clients
