"""Fixed-point encoding of real vectors into the ring Z_{2^k} (two's complement), so that summing
encodings mod 2^k and decoding gives the sum of the rounded vectors exactly — as long as the sum's
magnitude stays below 2^(k−1) / scale. Values that could break that are refused, never clipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfpl.errors import ProtocolError


@dataclass(frozen=True)
class FixedPoint:
    ring_bits: int = 64
    scale: float = float(2**24)  # a real x becomes round(x · scale)

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.ring_bits) - 1) if self.ring_bits < 64 else np.uint64(2**64 - 1)

    @property
    def limit(self) -> float:
        """The largest magnitude a *sum* may reach: 2^(k−1) / scale."""
        return 2.0 ** (self.ring_bits - 1) / self.scale

    def bound(self, summands: int = 1, reserve: int = 0) -> float:
        """The largest magnitude one party's real value may have: the sum of ``summands`` of them plus
        ``reserve`` (integer room kept for distributed noise) stays below 2^(k−1)."""
        return max(0.0, (2.0 ** (self.ring_bits - 1) - 1 - reserve) / self.scale) / max(1, summands)

    def quantize(self, x: np.ndarray, summands: int = 1, reserve: int = 0) -> np.ndarray:
        """round(x · scale) as int64; refuses values whose sum over ``summands`` parties, plus
        ``reserve`` integer units of noise, could wrap the ring."""
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ProtocolError("a vector to aggregate securely holds NaN or inf")
        bound = self.bound(summands, reserve)
        if x.size and float(np.abs(x).max()) + 0.5 / self.scale >= bound:
            raise ProtocolError(
                f"a value of magnitude {float(np.abs(x).max()):.3g} cannot be aggregated securely: with "
                f"{summands} parties and scale {self.scale:g} in a 2^{self.ring_bits} ring"
                + (f" keeping {reserve} for the distributed noise" if reserve else "")
                + f" each must stay below {bound:.3g} (raise secure.ring_bits or lower secure.frac_bits)"
            )
        return np.rint(x * self.scale).astype(np.int64)

    def to_ring(self, integers: np.ndarray) -> np.ndarray:
        return integers.astype(np.int64).view(np.uint64) & self.modulus_mask

    def encode(self, x: np.ndarray, summands: int = 1) -> np.ndarray:
        return self.to_ring(self.quantize(x, summands))

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Signed reals from ring elements (a sum of encodings)."""
        r = np.asarray(ring, dtype=np.uint64) & self.modulus_mask
        if self.ring_bits == 64:
            signed = r.view(np.int64)
        else:  # two's complement in k bits: shift by half the ring (uint64, no int64 overflow at k = 63)
            half = np.uint64(1 << (self.ring_bits - 1))
            signed = ((r + half) & self.modulus_mask).astype(np.int64) - np.int64(1 << (self.ring_bits - 1))
        return signed.astype(np.float64) / self.scale
