"""Cryptographic primitives from maintained libraries, never hand-rolled: X25519 key agreement and
HKDF-SHA256 (``cryptography``), ChaCha20-Poly1305 AEAD for shares in transit, and a ChaCha20
keystream as the PRG that expands seeds into masks. Shamir sharing lives in
:mod:`pfpl.secure.shamir` (a prime field; its randomness is the OS CSPRNG)."""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
SEED_BYTES = 32


class AuthenticationError(ValueError):
    """A ciphertext failed authentication (tampered, replayed into another round, or misrouted)."""


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive from X25519 + HKDF-SHA256 (``info`` binds its use)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes, nonce: bytes) -> bytes:
    """ChaCha20-Poly1305; ``associated`` (round, sender, recipient) is authenticated, not sent."""
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes, nonce: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise AuthenticationError("ciphertext failed authentication") from None


def prg(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` elements of Z_{2^ring_bits} (as uint64) from the ChaCha20 keystream of ``seed``."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * length))
    out = np.frombuffer(stream, dtype=np.uint64).copy()
    if ring_bits < 64:
        out &= np.uint64((1 << ring_bits) - 1)
    return out


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret, one per holder (holder i gets x = i + 1); any ``threshold``
    of them recover it."""
    from pfpl.secure import shamir

    if len(secret) != 32:
        raise ValueError("secrets are 32 bytes")
    return shamir.split_bytes(secret, threshold, holders)


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """The 32-byte secret from ``{holder index (0-based): share}``; needs at least the threshold."""
    from pfpl.secure import shamir

    return shamir.combine_bytes(shares, 32)
