"""Shamir secret sharing over a prime field (Python integers; randomness from the OS CSPRNG through
:mod:`secrets`). pycryptodome's GF(2^128) sharing is pure Python and spends ~30 s per SecAgg round
with 100 clients on polynomial arithmetic; over the Mersenne prime 2^521 − 1 the same work is a
few integer multiplications per share, and a 32-byte secret fits in one share (66 bytes)."""

from __future__ import annotations

import secrets as _secrets

#: the field: the Mersenne prime 2^521 − 1 (every 65-byte secret is below it)
PRIME = 2**521 - 1
SHARE_BYTES = 66


def split(secret: int, threshold: int, holders: int, prime: int = PRIME) -> list[int]:
    """Shares f(1), …, f(holders) of a random polynomial of degree ``threshold − 1`` with f(0) = secret."""
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must be between 1 and the number of holders ({holders})")
    if not 0 <= secret < prime:
        raise ValueError("the secret must be an element of the field")
    coefficients = [secret] + [_secrets.randbelow(prime) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for a in reversed(coefficients):  # Horner
            y = (y * x + a) % prime
        shares.append(y)
    return shares


def combine(shares: dict[int, int], prime: int = PRIME) -> int:
    """f(0) from ``{x: f(x)}`` (x ≥ 1) by Lagrange interpolation; needs at least ``threshold`` shares."""
    xs = list(shares)
    secret = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % prime
                den = den * (i - j) % prime
        secret = (secret + shares[i] * num * pow(den, -1, prime)) % prime
    return secret


def split_bytes(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    value = int.from_bytes(secret, "big")
    return [s.to_bytes(SHARE_BYTES, "big") for s in split(value, threshold, holders)]


def combine_bytes(shares: dict[int, bytes], length: int) -> bytes:
    """The secret from ``{holder index (0-based): share}``."""
    value = combine({i + 1: int.from_bytes(s, "big") for i, s in shares.items()})
    if value >= 1 << (8 * length):
        raise ValueError("the shares do not recover a secret (too few, or not of one secret)")
    return value.to_bytes(length, "big")
