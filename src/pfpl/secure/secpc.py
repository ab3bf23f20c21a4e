"""SecPC, pfpl's secure adaptive clustering for SecFPP (DESIGN §5).

Each client reduces a vector of its own (its mean image feature by default, or its personalized
prompt: ``secfpp.cluster_on``) with a public, seeded random projection, normalises it, and encodes
it in fixed point (integers). The N × d matrix X of all clients' rows is split by
columns into K slices; every client Lagrange-codes *its own row* of every slice with T fresh random
masks (:mod:`pfpl.secure.lcc`) and sends each worker its coded row — the workers (the clients
themselves) then hold a coded copy of the whole matrix, of which any T reveal nothing. The data
is shared once per clustering; each k-means iteration only broadcasts the public assignment. The
clients and the server are separate state machines exchanging messages
(:mod:`pfpl.secure.secpc_protocol`); :func:`cluster` runs them in memory, a Flower driver carries the
same messages.

Per iteration, for the assignment A (cluster sizes n_m, sums S = A·X), every worker evaluates the
degree-2 polynomial f_A on its share:

    D'[i, m] = n_m²·‖x_i‖² − 2·n_m·⟨x_i, S_m⟩ + ‖S_m‖²          = n_m²·‖x_i − c_m‖²
    E'[a, b] = n_b²·‖S_a‖² − 2·n_a·n_b·⟨S_a, S_b⟩ + n_a²·‖S_b‖²  = n_a²·n_b²·‖c_a − c_b‖²

and the server decodes f_A on every slice from any 2(K + T − 1) + 1 workers' results (each of
three primes, then the Chinese remainder theorem), sums the slices and obtains exact integer
squared distances. It assigns each client to its nearest centre and adapts the number of clusters:
a cluster whose mean squared distance exceeds ``split_threshold`` is split (its farthest member
seeds a new cluster), centres closer than ``merge_threshold`` are merged; it iterates until nothing
changes. The plaintext reference (:func:`plain_distances`) computes the same integers in the clear,
so both paths take identical decisions.

What the server learns: the assignment, and per slice the partial squared distances of every
client to every centre and between centres — never a prompt or a centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from pfpl.errors import PfplError
from pfpl.secure.field import Field

if TYPE_CHECKING:
    from pfpl.secure.secpc_protocol import SecPCStats

Distances = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ClusteringError(PfplError):
    """A secure clustering that cannot complete."""


@dataclass(frozen=True)
class SecPCSettings:
    projection_dim: int = 64
    frac_bits: int = 8
    slices: int = 2  # K
    privacy: int = 1  # T: colluding workers that learn nothing
    initial_clusters: int = 2
    split_threshold: float = 0.4  # mean squared distance (unit-norm features) above which a cluster splits
    merge_threshold: float = 0.2  # squared distance between centres below which two clusters merge
    min_split_size: int = 2  # clusters smaller than twice this never split
    max_iterations: int = 40
    restarts: int = 4  # adaptive k-means from this many public random starts; the best objective wins
    seed: int = 0


# ---- features ---------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _projection(features: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EC9C]))
    matrix = rng.standard_normal((features, dim)) / np.sqrt(dim)
    matrix.flags.writeable = False
    return matrix


def project_row(row: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """One client's row through the public, seeded Gaussian projection to ``dim`` coordinates, then
    normalised. Bit-for-bit the same on every machine and whether one row or a matrix is projected:
    exact IEEE products summed in one fixed order (no BLAS, whose blocking depends on the shapes and
    the CPU), and a correctly rounded norm (``math.fsum``)."""
    row = np.asarray(row, dtype=np.float64)
    if row.ndim != 1:
        raise ValueError(f"a client's row is 1-D, not of shape {row.shape}")
    out = np.add.reduce(row[:, None] * _projection(len(row), dim, seed), axis=0)  # sequential over the rows
    norm = math.sqrt(math.fsum(float(v) * float(v) for v in out))
    return out / max(norm, 1e-12)


def project(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Every row of ``features`` ``[N, F]`` through :func:`project_row` (so the matrix's rows are the
    clients' own projections exactly)."""
    features = np.asarray(features, dtype=np.float64)
    return np.stack([project_row(r, dim, seed) for r in features]) if len(features) else np.zeros((0, dim))


def quantize(x: np.ndarray, frac_bits: int) -> np.ndarray:
    return np.rint(x * 2.0**frac_bits).astype(np.int64)


# ---- distances ----------------------------------------------------------------------------------
def _indicator(assignment: np.ndarray, k: int) -> np.ndarray:
    a = np.zeros((k, len(assignment)), dtype=np.int64)
    a[assignment, np.arange(len(assignment))] = 1
    return a


def plain_distances(x: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D' [N, M], E' [M, M]) in exact integers, computed in the clear."""
    x = x.astype(object)
    k = int(assignment.max()) + 1
    a = _indicator(assignment, k).astype(object)
    n = a.sum(1)
    s = a @ x
    g = (x * x).sum(1)
    q = s @ s.T
    d = np.outer(g, n * n) - 2 * (x @ s.T) * n[None, :] + np.diag(q)[None, :]
    diag = np.diag(q)
    e = np.outer(diag, n * n) - 2 * q * np.outer(n, n) + np.outer(n * n, diag)
    return d, e


def _worker(field: Field, share: np.ndarray, a: np.ndarray, n: np.ndarray) -> np.ndarray:
    """f_A on one coded share ``[N, w]``: D' and E' flattened, in the field."""
    s = field.matmul(a, share)  # [M, w]
    g = field.reduce((share * share) % field.p @ np.ones(share.shape[1], dtype=np.int64))
    q = field.matmul(s, s.T)
    p = field.matmul(share, s.T)
    n2 = field.mul(n, n)
    d = (field.mul(g[:, None], n2[None, :]) - field.mul(2 * p, n[None, :]) + np.diag(q)[None, :]) % field.p
    diag = np.diag(q)
    e = (
        field.mul(diag[:, None], n2[None, :])
        - field.mul(field.mul(2 * q, n[:, None]), n[None, :])
        + field.mul(n2[:, None], diag[None, :])
    ) % field.p
    return np.concatenate([d.ravel(), e.ravel()])


# ---- adaptive k-means ---------------------------------------------------------------------------
@dataclass
class Clustering:
    assignment: np.ndarray
    iterations: int
    history: list[int]  # number of clusters after each iteration
    objective: float = 0.0  # within-cluster squared distances + split_threshold per cluster
    clients: np.ndarray | None = None  # the client ids ``assignment`` is for (None: the rows given, in order)


def _relabel(assignment: np.ndarray) -> np.ndarray:
    """Clusters numbered by first appearance, empty ones dropped."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(c), len(mapping)) for c in assignment], dtype=np.int64)


def _merged_dispersion(na: float, nb: float, da: float, db: float, centre_distance: float) -> float:
    """The mean squared distance to their common centre of two clusters' members, from decoded values."""
    return (na * da + nb * db) / (na + nb) + na * nb / (na + nb) ** 2 * centre_distance


def adaptive_kmeans(n: int, distances: Distances, settings: SecPCSettings, scale: float) -> Clustering:
    """The best of ``settings.restarts`` adaptive k-means runs from public random starts, by the
    objective Σ squared distances to the own centre + split_threshold × clusters (so a split must buy
    more than the dispersion a cluster may keep)."""
    best = None
    iterations = 0
    for start in range(max(1, settings.restarts)):
        run = _adaptive_kmeans(n, distances, settings, scale, start)
        iterations += run.iterations
        if best is None or run.objective < best.objective - 1e-12:
            best = run
    best.iterations = iterations
    return best


def _adaptive_kmeans(n: int, distances: Distances, settings: SecPCSettings, scale: float, start: int) -> Clustering:
    """Lloyd iterations on exact integer distances with split/merge rules; ``scale`` = 2^(2·frac_bits)."""
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0xC1A5, start]))
    k0 = max(1, min(settings.initial_clusters, n))
    assignment = _relabel(rng.permutation(np.arange(n) % k0))
    history = []
    for it in range(1, settings.max_iterations + 1):
        d, e = distances(assignment)
        k = d.shape[1]
        sizes = np.bincount(assignment, minlength=k).astype(object)
        real = np.array([[float(d[i, m]) / float(sizes[m] ** 2) / scale for m in range(k)] for i in range(n)])
        new = real.argmin(1)
        dispersion = np.array([real[assignment == m, m].mean() for m in range(k)])
        changed = not np.array_equal(new, assignment)
        if not changed:
            centre = np.array(
                [[float(e[a, b]) / float(sizes[a] ** 2 * sizes[b] ** 2) / scale for b in range(k)] for a in range(k)]
            )

            close = []
            for a in range(k):
                for b in range(a + 1, k):
                    union = _merged_dispersion(
                        float(sizes[a]), float(sizes[b]), dispersion[a], dispersion[b], centre[a, b]
                    )
                    if centre[a, b] < settings.merge_threshold or union <= settings.split_threshold:
                        close.append((union, a, b))
            wide = [
                m
                for m in range(k)
                if dispersion[m] > settings.split_threshold and int(sizes[m]) >= 2 * settings.min_split_size
            ]
            if close:
                _, a, b = min(close)
                new = np.where(assignment == b, a, assignment)
                changed = True
            elif wide:
                m = max(wide, key=lambda c: dispersion[c])
                members = np.flatnonzero(assignment == m)
                far = members[real[members, m].argmax()]
                new = assignment.copy()
                new[far] = k  # the farthest member seeds a new cluster
                changed = True
        history.append(int(new.max()) + 1)
        if not changed:
            objective = float(real[np.arange(n), assignment].sum()) + settings.split_threshold * k
            return Clustering(assignment, it, history, objective)
        assignment = _relabel(new)
    d, _ = distances(assignment)
    sizes = np.bincount(assignment).astype(object)
    within = sum(float(d[i, assignment[i]]) / float(sizes[assignment[i]] ** 2) / scale for i in range(n))
    return Clustering(assignment, settings.max_iterations, history, within + settings.split_threshold * len(sizes))


def cluster(
    features: np.ndarray, settings: SecPCSettings, secure: bool = True, absent_workers: set[int] | None = None
) -> tuple[Clustering, SecPCStats | None]:
    """SecPC on clients' vectors ``[N, F]`` (row i is client i's): the message protocol between N
    in-process clients and the server (:func:`pfpl.secure.secpc_protocol.run_secpc_in_memory`, the code
    a Flower driver runs too), or its plaintext reference (``secure=False``). ``absent_workers`` share
    their rows, then never return a result (they dropped out). Returns the clustering and the run's
    costs (``bytes_per_client``, ``client_seconds``, ``server_seconds``, ``rounds``; None in the clear)."""
    if not secure:
        x = quantize(project(features, settings.projection_dim, settings.seed), settings.frac_bits)
        scale = 2.0 ** (2 * settings.frac_bits)
        return adaptive_kmeans(len(x), lambda a: plain_distances(x, a), settings, scale), None
    from pfpl.secure.secpc_protocol import run_secpc_in_memory

    result, stats = run_secpc_in_memory(features, settings, absent_workers=absent_workers)
    if len(stats.owners) != len(features):
        lost = sorted(set(range(len(features))) - set(stats.owners))
        raise ClusteringError(f"secure clustering: the rows of clients {lost} did not reach every worker")
    result.clients = None
    return result, stats


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings (1 = identical partitions)."""
    from scipy.special import comb

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    pairs = comb(table, 2).sum()
    rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    total = comb(len(a), 2)
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((pairs - expected) / (maximum - expected))
