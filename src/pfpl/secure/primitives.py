"""Cryptographic primitives from maintained libraries, never hand-rolled: X25519 key agreement and
HKDF-SHA256 (``cryptography``), ChaCha20-Poly1305 AEAD for shares in transit, a ChaCha20
keystream as the PRG that expands seeds into masks, and SHA-256 commitments to self-mask seeds. Shamir sharing lives in
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
COMMITMENT_BYTES = 32


class AuthenticationError(ValueError):
    """A ciphertext failed authentication (tampered, replayed into another round, or misrouted)."""


class KeyAgreementError(ValueError):
    """A peer's X25519 public key yields no shared secret (a low-order point such as all zeros)."""


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
    """A 32-byte key both ends derive from X25519 + HKDF-SHA256 (``info`` binds its use); a
    :class:`KeyAgreementError` for a key that is not 32 bytes or a low-order point (``cryptography``
    refuses the all-zero shared secret such a key forces)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except (ValueError, TypeError) as err:
        raise KeyAgreementError(f"no key agreement with this public key ({err})") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def valid_public_key(raw: object, probe: X25519PrivateKey | None = None) -> bool:
    """Whether ``raw`` is an X25519 public key an honest peer can agree with: a trial exchange with an
    ephemeral key ``probe`` (a low-order point makes every exchange fail and would knock out its
    neighbours)."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        return False
    try:
        agree(probe or X25519PrivateKey.generate(), raw, b"pfpl-secagg/trial")
    except KeyAgreementError:
        return False
    return True


#: the field of Curve25519: an X25519 public key is a u-coordinate below it, top bit clear
CURVE_PRIME = 2**255 - 19


def canonical_public_key(raw: object) -> bool:
    """Whether ``raw`` is the canonical encoding of an X25519 u-coordinate (below 2^255 − 19, top bit
    clear): X25519 ignores the top bit and reduces modulo the prime, so other encodings of the same
    point are copies under another name."""
    return isinstance(raw, bytes) and len(raw) == KEY_BYTES and int.from_bytes(raw, "little") < CURVE_PRIME


def private_matches(private: X25519PrivateKey, public: bytes) -> bool:
    """Whether ``private`` is the secret key of the advertised ``public`` key (a check on a key
    rebuilt from shares)."""
    return public_bytes(private) == public


def commit(seed: bytes, context: bytes) -> bytes:
    """SHA-256 of a domain tag, ``context`` (round and owner) and a 32-byte random seed: it binds the
    owner to its seed (a seed rebuilt from shares is checked against it) and hides it (the seed has
    256 bits of entropy)."""
    digest = hashes.Hash(hashes.SHA256())
    for part in (b"pfpl-secagg/seed-commitment", context, seed):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.finalize()


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
    """The 32-byte secret from ``{holder index (0-based): share}``; needs at least the threshold and
    trusts every share (:func:`recover_secret` does not)."""
    from pfpl.secure import shamir

    return shamir.combine_bytes(shares, 32)


def recover_secret(shares: dict[int, bytes], threshold: int) -> tuple[bytes, list[int]]:
    """The 32-byte secret and the holder indices whose shares were wrong, correcting up to
    ⌊(s − t)/2⌋ wrong shares of s (Reed–Solomon decoding); :class:`pfpl.secure.shamir.DecodingError`
    when the shares determine no secret."""
    from pfpl.secure import shamir

    return shamir.decode_bytes(shares, threshold, 32)
