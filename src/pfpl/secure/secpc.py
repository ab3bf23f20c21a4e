"""SecPC, pfpl's secure adaptive clustering for SecFPP (DESIGN §5).

Each client reduces a vector of its own (its mean image feature by default, or its personalized
prompt: ``secfpp.cluster_on``) with a public, seeded random projection, normalises it, and encodes
it in fixed point (integers). The N × d matrix X of all clients' rows is split by
columns into K slices; every client Lagrange-codes *its own row* of every slice with T fresh random
masks (:mod:`pfpl.secure.lcc`) and sends each worker its coded row — the workers (the clients
themselves) then hold a coded copy of the whole matrix, of which any T reveal nothing. The data
is shared once per clustering; each k-means iteration only broadcasts the public assignment.

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pfpl.errors import PfplError
from pfpl.secure.field import PRIMES, Field, from_residues, to_residues
from pfpl.secure.lcc import LCC

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
def project(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The public, seeded Gaussian projection to ``dim`` coordinates, then each row normalised."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EC9C]))
    matrix = rng.standard_normal((features.shape[1], dim)) / np.sqrt(dim)
    out = features @ matrix
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


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


@dataclass
class SecureDistances:
    """The secret-shared side of SecPC: shares X once, then answers distance queries by LCC.

    ``x`` is the clients' quantized matrix (only used here to let each simulated client encode its
    own row); ``absent_workers`` never return a result (they dropped out)."""

    x: np.ndarray
    settings: SecPCSettings
    absent_workers: set[int] = field(default_factory=set)
    bytes_per_client: float = 0.0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    rounds: int = 0

    def __post_init__(self):
        n, d = self.x.shape
        k = self.settings.slices
        self.width = -(-d // k)
        padded = np.zeros((n, k * self.width), dtype=np.int64)
        padded[:, :d] = self.x
        slices = padded.reshape(n, k, self.width).transpose(1, 0, 2)  # [K, N, w]
        self.codes = [LCC(Field(p), k, self.settings.privacy, n) for p in PRIMES]
        start = time.perf_counter()
        # each client encodes its own row of every slice with its own masks; worker j's share is the
        # stack of the rows it received: shares[prime][j] = [N, w]
        self.shares = []
        for code, residues in zip(self.codes, to_residues(slices)):
            per_client = [code.encode(residues[:, i, :]) for i in range(n)]  # each [W, w]
            self.shares.append(np.stack(per_client, axis=1))  # [W, N, w]
        self.client_seconds += (time.perf_counter() - start) / n
        self.bytes_per_client += n * self.width * 8 * len(PRIMES)

    def __call__(self, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(assignment)
        k = int(assignment.max()) + 1
        a = _indicator(assignment, k)
        sizes = a.sum(1)
        decoded = []
        worker_time = 0.0
        for code, shares in zip(self.codes, self.shares):
            start = time.perf_counter()
            results = {j: _worker(code.field, shares[j], a, sizes) for j in range(n) if j not in self.absent_workers}
            worker_time += time.perf_counter() - start
            start = time.perf_counter()
            try:
                per_slice = code.decode(results, degree=2)  # [K, N·M + M·M]
            except PfplError as exc:
                raise ClusteringError(f"secure clustering: {exc}") from None
            decoded.append(per_slice.sum(0) % code.field.p)
            self.server_seconds += time.perf_counter() - start
        self.client_seconds += worker_time / max(1, n - len(self.absent_workers))
        self.bytes_per_client += (n * k + k * k) * 8 * len(PRIMES)
        self.rounds += 1
        flat = from_residues(decoded, PRIMES, signed=False)
        return flat[: n * k].reshape(n, k), flat[n * k :].reshape(k, k)


# ---- adaptive k-means ---------------------------------------------------------------------------
@dataclass
class Clustering:
    assignment: np.ndarray
    iterations: int
    history: list[int]  # number of clusters after each iteration
    objective: float = 0.0  # within-cluster squared distances + split_threshold per cluster


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
) -> tuple[Clustering, SecureDistances | None]:
    """SecPC on clients' personalized-prompt features ``[N, F]`` (secure, or its plaintext reference)."""
    x = quantize(project(features, settings.projection_dim, settings.seed), settings.frac_bits)
    scale = 2.0 ** (2 * settings.frac_bits)
    if not secure:
        return adaptive_kmeans(len(x), lambda a: plain_distances(x, a), settings, scale), None
    oracle = SecureDistances(x, settings, absent_workers or set())
    return adaptive_kmeans(len(x), oracle, settings, scale), oracle


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
