"""Arithmetic in prime fields F_p with p < 2^24, on numpy int64 arrays (products stay below 2^48,
so sums of up to 2^14 of them cannot overflow), and residue-number-system (RNS) integers: a value
is held modulo several such primes at once and recovered exactly by the Chinese remainder theorem,
which gives 72-bit integers from fast 64-bit arithmetic.

Randomness for masks comes from the ChaCha20 PRG of :mod:`pfpl.secure.primitives` keyed by OS
entropy (never numpy's generators, which are not cryptographic)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pfpl.secure import primitives as P

#: three primes just below 2^24 (their product, ~2^72, is the RNS range)
PRIMES: tuple[int, ...] = (16777213, 16777199, 16777183)
_CHUNK = 1 << 14  # inner-dimension chunk for matmul: 2^14 · 2^48 < 2^63


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


@dataclass(frozen=True)
class Field:
    p: int

    def __post_init__(self):
        if not (2 < self.p < 1 << 24):
            raise ValueError(f"field prime {self.p} must be below 2^24 for int64 arithmetic")

    def reduce(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.int64) % self.p

    def mul(self, a, b) -> np.ndarray:
        return (np.asarray(a, dtype=np.int64) * np.asarray(b, dtype=np.int64)) % self.p

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
        for start in range(0, a.shape[1], _CHUNK):
            out = (out + a[:, start : start + _CHUNK] @ b[start : start + _CHUNK]) % self.p
        return out

    def inverse(self, a: int) -> int:
        return pow(int(a) % self.p, self.p - 2, self.p)

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform field elements from a fresh OS-keyed ChaCha20 stream (bias < p / 2^64)."""
        n = int(np.prod(shape)) if shape else 1
        raw = P.prg(os.urandom(P.SEED_BYTES), n, 64)
        return (raw % np.uint64(self.p)).astype(np.int64).reshape(shape)

    def lagrange(self, points: list[int], at: list[int]) -> np.ndarray:
        """``[len(at), len(points)]``: the Lagrange basis over ``points`` evaluated at ``at``."""
        out = np.zeros((len(at), len(points)), dtype=np.int64)
        for r, z in enumerate(at):
            for k, xk in enumerate(points):
                num, den = 1, 1
                for m, xm in enumerate(points):
                    if m != k:
                        num = num * (z - xm) % self.p
                        den = den * (xk - xm) % self.p
                out[r, k] = num * self.inverse(den) % self.p
        return out


def to_residues(x: np.ndarray, primes: tuple[int, ...] = PRIMES) -> list[np.ndarray]:
    """Signed integers (int64) as residues modulo each prime."""
    return [np.asarray(x, dtype=np.int64) % p for p in primes]


def from_residues(residues: list[np.ndarray], primes: tuple[int, ...] = PRIMES, signed: bool = True) -> np.ndarray:
    """The integers (Python ints in an object array) with these residues, by CRT; ``signed`` maps
    the upper half of the range to negative numbers."""
    modulus = 1
    for p in primes:
        modulus *= p
    total = np.zeros(residues[0].shape, dtype=object)
    for r, p in zip(residues, primes):
        m = modulus // p
        total = total + r.astype(object) * (m * pow(m, -1, p))
    total = total % modulus
    if signed:
        total = np.where(total > modulus // 2, total - modulus, total)
    return total
