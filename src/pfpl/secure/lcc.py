"""Lagrange coded computing (Yu et al., AISTATS 2019) over a prime field: a secret split into K
slices is encoded, together with T uniformly random masks, as evaluations of one polynomial u(z)
of degree K + T − 1; a worker holding u(α_j) computes any polynomial f of degree deg on it; from
any deg·(K + T − 1) + 1 workers' results the decoder interpolates f(u(z)) and reads f on every
slice at its point β_k. Any T workers together learn nothing about the slices (their shares are
uniform), and the missing workers beyond the recovery threshold are tolerated.

The encoding is linear, so each data owner can encode its own rows (:func:`encode_rows`): the
workers' shares are then the sums of what every owner sent them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfpl.errors import PfplError
from pfpl.secure.field import Field


class RecoveryError(PfplError):
    """Fewer worker results than the recovery threshold of a Lagrange-coded computation."""


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
        return self.field.lagrange(self.betas, self.alphas)

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
        points = [self.alphas[j] for j in chosen]
        weights = self.field.lagrange(points, self.betas[: self.slices])  # [K, need]
        stacked = np.stack([results[j] for j in chosen]).reshape(need, -1)
        return self.field.matmul(weights, stacked).reshape(self.slices, *results[chosen[0]].shape)
