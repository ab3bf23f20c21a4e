"""Shamir secret sharing over a prime field (Python integers; randomness from the OS CSPRNG through
:mod:`secrets`). pycryptodome's GF(2^128) sharing is pure Python and spends ~30 s per SecAgg round
with 100 clients on polynomial arithmetic; over the Mersenne prime 2^521 − 1 the same work is a
few integer multiplications per share, and a 32-byte secret fits in one share (66 bytes).

Shares at x = 1, …, n of a polynomial of degree < t are a Reed–Solomon codeword, so :func:`decode`
recovers the secret from s shares of which up to ⌊(s − t)/2⌋ are wrong (Berlekamp–Welch) and names
the wrong ones: a holder that returns a corrupted share is caught instead of spoiling the secret."""

from __future__ import annotations

import functools
import secrets as _secrets

#: the field: the Mersenne prime 2^521 − 1 (every 65-byte secret is below it)
PRIME = 2**521 - 1
SHARE_BYTES = 66


class DecodingError(ValueError):
    """The shares do not determine one secret: too few, or more wrong ones than can be corrected."""


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
    """f(0) from ``{x: f(x)}`` (x ≥ 1) by Lagrange interpolation; needs at least ``threshold`` shares
    and trusts every one of them (see :func:`decode` for shares that may be wrong)."""
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


@functools.lru_cache(maxsize=8192)
def _inverse(d: int, prime: int) -> int:
    # the differences of share positions are small integers: cache their inverses
    return pow(d % prime, -1, prime)


def _newton(xs: list[int], ys: list[int], prime: int) -> list[int]:
    """Divided-difference coefficients of the polynomial through (xs, ys): O(t²) small-integer
    divisions, then :func:`_newton_at` evaluates it anywhere in O(t)."""
    c = [y % prime for y in ys]
    for level in range(1, len(xs)):
        for j in range(len(xs) - 1, level - 1, -1):
            c[j] = (c[j] - c[j - 1]) * _inverse(xs[j] - xs[j - level], prime) % prime
    return c


def _newton_at(xs: list[int], c: list[int], x: int, prime: int) -> int:
    y = c[-1]
    for j in range(len(c) - 2, -1, -1):
        y = (y * (x - xs[j]) + c[j]) % prime
    return y


def _solve(rows: list[list[int]], unknowns: int, prime: int) -> list[int] | None:
    """One solution (free unknowns 0) of the augmented system ``rows`` over F_p; None if inconsistent."""
    m = [list(r) for r in rows]
    pivots: list[int] = []
    r = 0
    for col in range(unknowns):
        pivot = next((i for i in range(r, len(m)) if m[i][col] % prime), None)
        if pivot is None:
            continue
        m[r], m[pivot] = m[pivot], m[r]
        inv = pow(m[r][col], -1, prime)
        m[r] = [v * inv % prime for v in m[r]]
        for i in range(len(m)):
            if i != r and m[i][col] % prime:
                f = m[i][col]
                m[i] = [(a - f * b) % prime for a, b in zip(m[i], m[r])]
        pivots.append(col)
        r += 1
        if r == len(m):
            break
    if any(m[i][-1] % prime for i in range(r, len(m))):
        return None
    solution = [0] * unknowns
    for i, col in enumerate(pivots):
        solution[col] = m[i][-1]
    return solution


def _divide(num: list[int], den: list[int], prime: int) -> tuple[list[int], list[int]]:
    """Quotient and remainder of polynomials (coefficients low to high) by a monic ``den``."""
    num = list(num)
    steps = len(num) - len(den) + 1
    quotient = [0] * max(steps, 1)
    for i in range(steps - 1, -1, -1):
        coef = num[i + len(den) - 1] % prime
        quotient[i] = coef
        if coef:
            for j, d in enumerate(den):
                num[i + j] = (num[i + j] - coef * d) % prime
    return quotient, num[: len(den) - 1]


def _berlekamp_welch(xs: list[int], ys: list[int], threshold: int, prime: int) -> tuple[int, list[int]]:
    s = len(xs)
    e = (s - threshold) // 2
    if e == 0:
        raise DecodingError(f"{s} shares that disagree and no redundancy to correct them (threshold {threshold})")
    # Q(x) = P(x)·E(x) with E monic of degree e vanishing at the wrong shares: Q(x_i) = y_i·E(x_i)
    rows = []
    for x, y in zip(xs, ys):
        powers = [pow(x, j, prime) for j in range(e + threshold)]
        rows.append(powers + [(-y * powers[i]) % prime for i in range(e)] + [y * pow(x, e, prime) % prime])
    solution = _solve(rows, 2 * e + threshold, prime)
    if solution is None:
        raise DecodingError(f"more than {e} of {s} shares are wrong")
    q, locator = solution[: e + threshold], solution[e + threshold :] + [1]
    p, remainder = _divide(q, locator, prime)
    if any(remainder):
        raise DecodingError(f"more than {e} of {s} shares are wrong")
    wrong = [x for x, y in zip(xs, ys) if _horner(p, x, prime) != y]
    if len(wrong) > e:  # cannot happen for a genuine solution; kept as a guard
        raise DecodingError(f"more than {e} of {s} shares are wrong")
    return p[0] % prime, wrong


def _horner(coefficients: list[int], x: int, prime: int) -> int:
    y = 0
    for a in reversed(coefficients):
        y = (y * x + a) % prime
    return y


def decode(shares: dict[int, int], threshold: int, prime: int = PRIME) -> tuple[int, list[int]]:
    """f(0) and the positions x of the wrong shares, from ``{x: share}`` of which at most
    ⌊(s − t)/2⌋ are wrong (s shares, threshold t). The common case (every share on one polynomial)
    costs O(s·t); Berlekamp–Welch's O(s³) runs only when some share disagrees. A
    :class:`DecodingError` when the shares determine no secret."""
    out_of_field = sorted(x for x, y in shares.items() if not 0 <= y < prime)
    xs = sorted(x for x in shares if x not in out_of_field)
    ys = [shares[x] for x in xs]
    if len(shares) < threshold:
        raise DecodingError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    if len(xs) < threshold:
        raise DecodingError(f"{len(out_of_field)} of {len(shares)} shares are not field elements")
    base = _newton(xs[:threshold], ys[:threshold], prime)
    if all(_newton_at(xs, base, x, prime) == y for x, y in zip(xs[threshold:], ys[threshold:])):
        if len(out_of_field) > (len(shares) - threshold) // 2:
            raise DecodingError(f"more than {(len(shares) - threshold) // 2} of {len(shares)} shares are wrong")
        return _newton_at(xs, base, 0, prime), out_of_field
    secret, wrong = _berlekamp_welch(xs, ys, threshold, prime)
    if len(wrong) + len(out_of_field) > (len(shares) - threshold) // 2:
        raise DecodingError(f"more than {(len(shares) - threshold) // 2} of {len(shares)} shares are wrong")
    return secret, sorted(wrong + out_of_field)


def split_bytes(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    value = int.from_bytes(secret, "big")
    return [s.to_bytes(SHARE_BYTES, "big") for s in split(value, threshold, holders)]


def combine_bytes(shares: dict[int, bytes], length: int) -> bytes:
    """The secret from ``{holder index (0-based): share}``."""
    value = combine({i + 1: int.from_bytes(s, "big") for i, s in shares.items()})
    if value >= 1 << (8 * length):
        raise ValueError("the shares do not recover a secret (too few, or not of one secret)")
    return value.to_bytes(length, "big")


def decode_bytes(shares: dict[int, bytes], threshold: int, length: int) -> tuple[bytes, list[int]]:
    """The secret and the (0-based) holder indices whose shares were wrong, from ``{holder index:
    share}`` of which at most ⌊(s − t)/2⌋ are wrong; a :class:`DecodingError` otherwise."""
    value, wrong = decode({i + 1: int.from_bytes(s, "big") for i, s in shares.items()}, threshold)
    if value >= 1 << (8 * length):
        raise DecodingError("the shares do not decode to a secret of the expected length")
    return value.to_bytes(length, "big"), [x - 1 for x in wrong]
