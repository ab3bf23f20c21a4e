"""Lagrange coded computing (Yu et al., AISTATS 2019) over a prime field: a secret split into K
slices is encoded, together with T uniformly random masks, as evaluations of one polynomial u(z)
of degree K + T − 1; a worker holding u(α_j) computes any polynomial f of degree deg on it; from
any deg·(K + T − 1) + 1 workers' results the decoder interpolates f(u(z)) and reads f on every
slice at its point β_k. Any T workers together learn nothing about the slices (their shares are
uniform), and the missing workers beyond the recovery threshold are tolerated.

The encoding is linear, so each data owner can encode its own rows: the workers' shares are then
the stacks of what every owner sent them. Results beyond the recovery threshold are redundant: an
honest set lies on one polynomial of degree deg·(K + T − 1), so :meth:`LCC.decode_checked` checks
the spare results against the interpolated one and turns a wrong result (a faulty or lying worker,
or an owner whose coded rows are no codeword) into a named exclusion or a clean error, never a
silently wrong decode."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pfpl.errors import PfplError
from pfpl.secure.field import Field


class RecoveryError(PfplError):
    """Fewer worker results than the recovery threshold of a Lagrange-coded computation."""


class InconsistentResultsError(RecoveryError):
    """Worker results that lie on no polynomial of the computation's degree (a wrong result)."""


@lru_cache(maxsize=512)
def _basis(p: int, points: tuple[int, ...], at: tuple[int, ...]) -> np.ndarray:
    """Field(p).lagrange, cached (pure Python: the same bases recur in every encode and every round)."""
    out = Field(p).lagrange(list(points), list(at))
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class LCC:
    field: Field
    slices: int  # K
    privacy: int  # T: any T workers learn nothing
    workers: int  # W: how many coded shares are made

    @property
    def betas(self) -> list[int]:
        return list(range(1, self.slices + self.privacy + 1))

    @property
    def alphas(self) -> list[int]:
        start = self.slices + self.privacy + 1
        return list(range(start, start + self.workers))

    def __post_init__(self):
        if self.slices + self.privacy + self.workers >= self.field.p:
            raise ValueError("the field is too small for this many evaluation points")

    def recovery_threshold(self, degree: int) -> int:
        return degree * (self.slices + self.privacy - 1) + 1

    def encoding_matrix(self) -> np.ndarray:
        """``[W, K + T]``: worker j's share is Σ_k M[j, k]·X_k + Σ_t M[j, K + t]·Z_t."""
        return _basis(self.field.p, tuple(self.betas), tuple(self.alphas))

    def encode(self, slices: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Shares ``[W, ...]`` of ``slices`` ``[K, ...]`` with masks ``[T, ...]`` (fresh random by default)."""
        if masks is None:
            masks = self.field.random((self.privacy, *slices.shape[1:]))
        data = np.concatenate([self.field.reduce(slices), self.field.reduce(masks)]).reshape(
            self.slices + self.privacy, -1
        )
        return self.field.matmul(self.encoding_matrix(), data).reshape(self.workers, *slices.shape[1:])

    def decode(self, results: dict[int, np.ndarray], degree: int) -> np.ndarray:
        """``[K, ...]``: f on every slice, from ``{worker index: f(share)}`` of a degree-``degree`` f."""
        need = self.recovery_threshold(degree)
        if len(results) < need:
            raise RecoveryError(
                f"lagrange-coded computing: {len(results)} worker results, below the recovery threshold "
                f"{need} = {degree}·(K + T − 1) + 1 with K = {self.slices}, T = {self.privacy}"
            )
        chosen = sorted(results)[:need]
        points = tuple(self.alphas[j] for j in chosen)
        weights = _basis(self.field.p, points, tuple(self.betas[: self.slices]))  # [K, need]
        stacked = np.stack([results[j] for j in chosen]).reshape(need, -1)
        return self.field.matmul(weights, stacked).reshape(self.slices, *results[chosen[0]].shape)

    def _consistent(self, workers: list[int], flat: dict[int, np.ndarray], need: int) -> bool:
        """Whether the results of ``workers`` lie on the polynomial through the first ``need`` of them."""
        if len(workers) <= need:
            return True
        used, spare = workers[:need], workers[need:]
        basis = _basis(self.field.p, tuple(self.alphas[j] for j in used), tuple(self.alphas[j] for j in spare))
        predicted = self.field.matmul(basis, np.stack([flat[j] for j in used]))
        return bool(np.array_equal(predicted, np.stack([flat[j] for j in spare])))

    def decode_checked(
        self, results: dict[int, np.ndarray], degree: int, spare: int | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`decode`, checked against up to ``spare`` (default: the threshold) further results.

        Returns the decode and the workers excluded as wrong: a single wrong result among the checked
        ones is found (leaving it out makes the rest agree, with two spare results or more) and
        excluded; anything else that disagrees raises one :class:`InconsistentResultsError`. Up to
        ``spare`` wrong results among the checked are always detected, never decoded."""
        need = self.recovery_threshold(degree)
        if len(results) < need:
            return self.decode(results, degree), []  # raises the RecoveryError
        pool = sorted(results)[: need + (need if spare is None else max(0, spare))]
        flat = {j: self.field.reduce(results[j]).reshape(-1) for j in pool}
        if self._consistent(pool, flat, need):
            return self.decode({j: results[j] for j in pool[:need]}, degree), []
        if len(pool) >= need + 2:
            for wrong in pool:
                rest = [j for j in pool if j != wrong]
                if self._consistent(rest, flat, need):
                    return self.decode({j: results[j] for j in rest[:need]}, degree), [wrong]
        raise InconsistentResultsError(
            f"lagrange-coded computing: the results of workers {pool} lie on no polynomial of degree "
            f"{need - 1} (a wrong result, or an owner whose coded rows are no codeword)"
        )
