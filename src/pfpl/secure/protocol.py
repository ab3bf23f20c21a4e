"""SecAgg / SecAgg+ (Bonawitz et al. CCS 2017; Bell et al. CCS 2020) as a client and a server state
machine that exchange plain messages — the bytes and arrays a network transport carries.

One protocol instance sums the vectors (elements of Z_{2^k}) of a set of participants:

0. the server sends each participant a :class:`Setup` (round id, its neighbours, threshold t);
1. each client advertises two X25519 public keys and a commitment to its self-mask seed
   (:class:`AdvertiseKeys`); the server checks every key with a trial exchange and forwards its
   neighbours' keys (:class:`NeighbourKeys`);
2. each client Shamir-shares (t of its neighbourhood + itself) its self-mask seed and its mask secret
   key, encrypts each holder's shares with an AEAD keyed by their X25519 agreement and bound to the
   round, both ids and both parties' public keys (:class:`EncryptedShares`); the server routes them
   (:class:`SharesForYou`);
3. each client that holds at least t shares sends its vector masked with PRG(self seed) and
   ±PRG(pairwise key) for every neighbour that shared (:class:`MaskedInput`), and names neighbours
   whose shares failed authentication;
4. the server names the survivors (masked input received) and the dropped (shared keys, no input);
   each client checks the request (it is among the survivors, at least t of its neighbourhood
   survive, it only hears of clients it exchanged shares with, never both shares of one client) and
   returns self-seed shares of survivors and key shares of the dropped (:class:`UnmaskShares`); the
   server decodes the seeds and keys (Reed–Solomon: wrong shares are corrected and their holders
   named), checks each against its owner's commitment or public key, removes the masks and obtains
   the sum of the survivors' vectors.

Each client runs every phase once and in order. An accusation (a neighbour's shares failed
authentication) drops the accuser as well as the accused, so it never ejects an honest client for
free. A message of the wrong round, sender, type, shape, length or ring is rejected with a logged
reason naming the client, who is then treated as dropped; an instance that cannot complete fails
with one :class:`SecureAggregationError`. Nothing a client sends makes the server raise anything else.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pfpl.errors import ConfigError, PfplError, ProtocolError
from pfpl.messages import PHASES
from pfpl.secure import primitives as P
from pfpl.secure import shamir

log = logging.getLogger(__name__)

SHARE_INFO = b"pfpl-secagg/share"
MASK_INFO = b"pfpl-secagg/mask"
#: an encrypted (seed share, key share) pair: two field elements and the AEAD tag
CIPHERTEXT_BYTES = 2 * shamir.SHARE_BYTES + 16


class SecureAggregationError(PfplError):
    """A secure aggregation that cannot complete (too few clients answered, or too few honest shares)."""


# ---- messages -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    round_id: bytes
    recipient: int
    neighbours: tuple[int, ...]
    threshold: int
    vector_length: int
    ring_bits: int


@dataclass(frozen=True)
class AdvertiseKeys:
    round_id: bytes
    sender: int
    cipher_key: bytes
    mask_key: bytes
    seed_commitment: bytes  # P.commit(self-mask seed): a seed rebuilt from shares is checked against it


@dataclass(frozen=True)
class NeighbourKeys:
    round_id: bytes
    recipient: int
    keys: dict[int, tuple[bytes, bytes]]  # neighbour -> (cipher key, mask key)


@dataclass(frozen=True)
class EncryptedShares:
    round_id: bytes
    sender: int
    ciphertexts: dict[int, bytes]  # holder -> ciphertext of (seed share, key share)


@dataclass(frozen=True)
class SharesForYou:
    round_id: bytes
    recipient: int
    ciphertexts: dict[int, bytes]  # sender -> ciphertext


@dataclass(frozen=True)
class MaskedInput:
    round_id: bytes
    sender: int
    masked: np.ndarray  # uint64, each < 2^ring_bits
    rejected: tuple[int, ...] = ()  # neighbours whose shares failed authentication (the sender drops too)


@dataclass(frozen=True)
class UnmaskRequest:
    round_id: bytes
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskShares:
    round_id: bytes
    sender: int
    seed_shares: dict[int, bytes]  # survivor -> share of its self-mask seed
    key_shares: dict[int, bytes]  # dropped -> share of its mask secret key


def _ids(a: int, b: int) -> bytes:
    return struct.pack(">ii", a, b)


def _pair_info(label: bytes, round_id: bytes, i: int, j: int, key_i: bytes, key_j: bytes) -> bytes:
    """HKDF info of the key clients i and j agree for ``label``: the round, both ids and both public
    keys, in id order. Without the ids and keys a colluder advertising a copy of an honest client's
    key would agree the very same pairwise mask with their common neighbour, once with each sign, and
    the two would cancel out of that neighbour's masked input."""
    (a, ka), (b, kb) = sorted([(i, key_i), (j, key_j)])
    return label + round_id + _ids(a, b) + ka + kb


def _nonce(sender: int, recipient: int) -> bytes:
    return _ids(sender, recipient) + b"\x00" * 4


def _binding(round_id: bytes, sender: int, recipient: int, sender_keys, recipient_keys) -> bytes:
    """The AEAD's associated data: round, both ids and both parties' public keys as each end saw them,
    so a key altered on its way to one neighbour makes that neighbour's decryption fail (and it
    accuses) instead of leaving pairwise masks that silently do not cancel."""
    return round_id + _ids(sender, recipient) + b"".join(sender_keys) + b"".join(recipient_keys)


def _commitment_context(round_id: bytes, owner: int) -> bytes:
    return round_id + struct.pack(">i", owner)


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _mask_mod(x: np.ndarray, ring_bits: int) -> np.ndarray:
    return x & np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else x


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(xs: object) -> bool:
    return isinstance(xs, (tuple, list)) and all(_is_id(x) for x in xs) and len(set(xs)) == len(xs)


def _is_share(s: object) -> bool:
    return isinstance(s, bytes) and len(s) == shamir.SHARE_BYTES and int.from_bytes(s, "big") < shamir.PRIME


def _is_id_map(m: object, value: Callable[[object], bool]) -> bool:
    return isinstance(m, dict) and all(_is_id(k) and value(v) for k, v in m.items())


# ---- client -----------------------------------------------------------------------------------
#: a client's stages in order; each phase moves it from the stage before to its own, exactly once
STAGES = ("new", "setup", "share_keys", "masked_input", "unmask")
ABORTED = -1  # a phase refused or failed: the client answers nothing more in this instance


class SecAggClient:
    """One client's side of one protocol instance, holding its (already encoded) ring vector — from the
    start, or given with the masked-input phase (an instance set up before the exchange it sums, so its
    key rounds ride on the round trips of the exchange before). It trusts neither the server nor its
    neighbours: every message is checked before use, and every refusal is one :class:`ProtocolError`
    (or :class:`SecureAggregationError`) line naming it."""

    def __init__(self, client: int, vector: np.ndarray | None = None):
        self.id = client
        self.vector = None if vector is None else np.asarray(vector, dtype=np.uint64)
        self.stage = 0  # index into STAGES, or ABORTED
        self.setup_msg: Setup | None = None
        self.shared_with: tuple[int, ...] = ()  # neighbours that shared keys with us (U2 ∩ N): we mask with them
        self.held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (seed share, key share) held for it
        self.accused: tuple[int, ...] = ()  # neighbours whose shares failed authentication

    # ---- the state machine --------------------------------------------------------------------
    @property
    def consumed(self) -> bool:
        """Whether this client's vector has left it (masked) or the instance is over for it: its
        upload must not be used by another instance of the same exchange."""
        return self.stage == ABORTED or self.stage >= STAGES.index("masked_input")

    @property
    def finished(self) -> bool:
        return self.stage == len(STAGES) - 1

    def _begin(self, step: str) -> None:
        """Each phase once and in order: a repeated or early phase is how a server would run one
        exchange twice (e.g. ask for a seed share, then for the key share of the same client)."""
        expected = STAGES.index(step) - 1
        if self.stage != expected:
            now = "aborted" if self.stage == ABORTED else STAGES[self.stage]
            raise ProtocolError(
                f"client {self.id}: {step} asked at stage {now!r}; each phase runs once, in the order "
                f"{', '.join(STAGES[1:])}"
            )

    def _run(self, step: str, body: Callable[[object], object], msg: object):
        """Run one phase: refused out of order; any refusal inside leaves the client aborted."""
        self._begin(step)
        try:
            out = body(msg)
        except Exception:
            self.stage = ABORTED
            raise
        self.stage = STAGES.index(step)
        return out

    def _check(self, msg, cls: type) -> None:
        if not isinstance(msg, cls):
            raise ProtocolError(f"client {self.id}: a {type(msg).__name__} where a {cls.__name__} was expected")
        if not isinstance(msg.round_id, bytes) or (
            self.setup_msg is not None and msg.round_id != self.setup_msg.round_id
        ):
            raise ProtocolError(f"client {self.id}: a message of another protocol round")
        if msg.recipient != self.id:
            raise ProtocolError(f"client {self.id}: a message addressed to client {msg.recipient}")

    @property
    def holders(self) -> list[int]:
        """Who holds shares of this client's secrets: its neighbours and itself, sorted."""
        return sorted({*self.setup_msg.neighbours, self.id})

    def _own_keys(self) -> tuple[bytes, bytes]:
        return P.public_bytes(self.cipher_sk), P.public_bytes(self.mask_sk)

    def _info(self, label: bytes, peer: int, peer_keys: tuple[bytes, bytes], which: int) -> bytes:
        """The HKDF info of the key this client agrees with ``peer`` (0: share channel, 1: pairwise mask)."""
        return _pair_info(label, self.setup_msg.round_id, self.id, peer, self._own_keys()[which], peer_keys[which])

    # ---- phase 1 ------------------------------------------------------------------------------
    def setup(self, msg: Setup) -> AdvertiseKeys:
        return self._run("setup", self._setup, msg)

    def _setup(self, msg: Setup) -> AdvertiseKeys:
        self._check(msg, Setup)
        if not msg.round_id:
            raise ProtocolError(f"client {self.id}: an empty round id")
        if not _is_ids(msg.neighbours) or self.id in msg.neighbours:
            raise ProtocolError(f"client {self.id}: neighbours {msg.neighbours!r} are not distinct other clients")
        numbers = (msg.threshold, msg.vector_length, msg.ring_bits)
        if not all(_is_id(v) for v in numbers) or not 1 <= msg.ring_bits <= 64:
            raise ProtocolError(f"client {self.id}: a malformed setup (threshold, length or ring)")
        if self.vector is not None and len(self.vector) != msg.vector_length:
            raise ProtocolError(f"client {self.id}: vector of length {len(self.vector)}, not {msg.vector_length}")
        holders = len(msg.neighbours) + 1
        if not holders < 2 * msg.threshold <= 2 * holders:
            raise ProtocolError(
                f"client {self.id}: threshold {msg.threshold} is not a strict majority of its {holders} holders "
                "(two disjoint sets of them could each unmask)"
            )
        self.setup_msg = msg
        self.cipher_sk, cipher_pk = P.new_key_pair()
        self.mask_sk, mask_pk = P.new_key_pair()
        self.seed = os.urandom(P.SEED_BYTES)
        commitment = P.commit(self.seed, _commitment_context(msg.round_id, self.id))
        return AdvertiseKeys(msg.round_id, self.id, cipher_pk, mask_pk, commitment)

    # ---- phase 2 ------------------------------------------------------------------------------
    def share_keys(self, msg: NeighbourKeys) -> EncryptedShares:
        return self._run("share_keys", self._share_keys, msg)

    def _share_keys(self, msg: NeighbourKeys) -> EncryptedShares:
        self._check(msg, NeighbourKeys)
        s = self.setup_msg
        if not isinstance(msg.keys, dict) or not set(msg.keys) <= set(s.neighbours):
            raise ProtocolError(f"client {self.id}: keys of clients that are not its neighbours")
        peers: dict[int, tuple[bytes, bytes]] = {}
        channel: dict[int, bytes] = {}
        for j, pair in msg.keys.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(k, bytes) for k in pair)):
                raise ProtocolError(f"client {self.id}: a malformed key pair for client {j}")
            try:  # a peer whose agreement fails (a low-order key) did not share: leave it out, do not crash
                if not all(P.canonical_public_key(k) for k in pair) or set(pair) & set(self._own_keys()):
                    raise P.KeyAgreementError("a non-canonical key, or a copy of this client's own")
                channel[j] = P.agree(self.cipher_sk, pair[0], self._info(SHARE_INFO, j, pair, 0))
                P.agree(self.mask_sk, pair[1], self._info(MASK_INFO, j, pair, 1))
            except P.KeyAgreementError:
                log.warning("secure aggregation: client %d cannot agree keys with client %d; left out", self.id, j)
                channel.pop(j, None)
                continue
            peers[j] = pair
        self.peer_keys = peers
        present = [h for h in self.holders if h == self.id or h in peers]
        if len(present) < s.threshold:
            raise SecureAggregationError(
                f"client {self.id}: only {len(present)} of its neighbourhood advertised keys, "
                f"below the threshold {s.threshold}"
            )
        seed_shares = P.split_secret(self.seed, s.threshold, len(self.holders))
        key_shares = P.split_secret(P.private_bytes(self.mask_sk), s.threshold, len(self.holders))
        mine = self._own_keys()
        out = {}
        for pos, holder in enumerate(self.holders):
            if holder not in present:
                continue
            if holder == self.id:
                self.held[self.id] = (seed_shares[pos], key_shares[pos])
                continue
            associated = _binding(s.round_id, self.id, holder, mine, peers[holder])
            plaintext = seed_shares[pos] + key_shares[pos]
            out[holder] = P.encrypt(channel[holder], plaintext, associated, _nonce(self.id, holder))
        return EncryptedShares(s.round_id, self.id, out)

    # ---- phase 3 ------------------------------------------------------------------------------
    def masked_input(self, msg: SharesForYou, vector: np.ndarray | None = None) -> MaskedInput:
        """``vector``: the client's ring vector, if it was not given at the start (once, either way)."""
        return self._run("masked_input", lambda m: self._masked_input(m, vector), msg)

    def _masked_input(self, msg: SharesForYou, vector: np.ndarray | None = None) -> MaskedInput:
        self._check(msg, SharesForYou)
        s = self.setup_msg
        if (vector is None) == (self.vector is None):
            raise ProtocolError(f"client {self.id}: its vector must be given exactly once (at the start or now)")
        if vector is not None:
            vector = np.asarray(vector, dtype=np.uint64)
            if vector.shape != (s.vector_length,):
                raise ProtocolError(f"client {self.id}: vector of shape {vector.shape}, not ({s.vector_length},)")
            self.vector = vector
        if not _is_id_map(msg.ciphertexts, lambda v: isinstance(v, bytes)):
            raise ProtocolError(f"client {self.id}: malformed routed shares")
        mine = self._own_keys()
        accused, shared = [], []
        for sender in sorted(msg.ciphertexts):
            if sender not in self.peer_keys:  # the server routed shares we never agreed keys for
                log.warning(
                    "secure aggregation: client %d got shares from %d, not a neighbour it shared with; ignored",
                    self.id,
                    sender,
                )
                continue
            shared.append(sender)
            try:
                key = P.agree(
                    self.cipher_sk, self.peer_keys[sender][0], self._info(SHARE_INFO, sender, self.peer_keys[sender], 0)
                )
                associated = _binding(s.round_id, sender, self.id, self.peer_keys[sender], mine)
                plain = P.decrypt(key, msg.ciphertexts[sender], associated, _nonce(sender, self.id))
            except P.AuthenticationError:
                plain = b""
            seed_share, key_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if not (_is_share(seed_share) and _is_share(key_share)):
                accused.append(sender)
                log.warning(
                    "secure aggregation: shares from client %d to client %d failed authentication; "
                    "client %d accuses it (and drops out with it)",
                    sender,
                    self.id,
                    self.id,
                )
                continue
            self.held[sender] = (seed_share, key_share)
        self.shared_with = tuple(shared)  # the server's U2 ∩ N: mask with every one of them
        self.accused = tuple(accused)
        self._check_enough_shares()
        if self.accused:  # the server discards an accuser's input: send nothing of the vector
            return MaskedInput(s.round_id, self.id, np.zeros(s.vector_length, dtype=np.uint64), self.accused)
        y = self.vector + P.prg(self.seed, s.vector_length, s.ring_bits)
        for j in self.shared_with:
            key = P.agree(self.mask_sk, self.peer_keys[j][1], self._info(MASK_INFO, j, self.peer_keys[j], 1))
            pairwise = P.prg(key, s.vector_length, s.ring_bits)
            y = y + pairwise if _sign(self.id, j) > 0 else y - pairwise
        return MaskedInput(s.round_id, self.id, _mask_mod(y, s.ring_bits), ())

    def _check_enough_shares(self) -> None:
        """Fewer than t shares held (its own included) means too few neighbours can take part in the
        unmasking: masking anyway would send x + PRG(seed) with hardly any pairwise mask, and the
        seed's shares alone would then reveal x."""
        t = self.setup_msg.threshold
        if len(self.held) < t:
            raise SecureAggregationError(
                f"client {self.id}: holds {len(self.held)} shares (its own and {len(self.held) - 1} neighbours'), "
                f"below the threshold {t}; it sends no masked input"
            )

    # ---- phase 4 ------------------------------------------------------------------------------
    def unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        return self._run("unmask", self._unmask, msg)

    def _unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        self._check(msg, UnmaskRequest)
        if not (_is_ids(msg.survivors) and _is_ids(msg.dropped)):
            raise ProtocolError(f"client {self.id}: a malformed unmasking request")
        self._check_request(msg)
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        seeds = {i: self.held[i][0] for i in sorted(survivors)}
        keys = {i: self.held[i][1] for i in sorted(dropped)}
        return UnmaskShares(msg.round_id, self.id, seeds, keys)

    def _check_request(self, msg: UnmaskRequest) -> None:
        """What a server could ask to learn one client's vector: both shares of a client; a survivor's
        own key (telling it that it dropped); the seed of a client whose neighbours it claims dropped
        (too few survivors: Bonawitz's check, in the client's own neighbourhood); clients this one
        never exchanged shares with; or anything at all once it accused a neighbour (it dropped)."""
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        t = self.setup_msg.threshold
        if survivors & dropped:
            raise ProtocolError(
                f"client {self.id}: asked to reveal both shares of clients {sorted(survivors & dropped)}"
            )
        if self.accused:
            raise ProtocolError(
                f"client {self.id}: it accused clients {list(self.accused)} and so dropped out; "
                "it answers no unmasking request"
            )
        if self.id in dropped:
            raise ProtocolError(f"client {self.id}: told that it dropped while it is alive (its own key share)")
        if self.id not in survivors:
            raise ProtocolError(f"client {self.id}: an unmasking request that does not count it among the survivors")
        strangers = sorted(survivors - set(self.shared_with) - {self.id})
        if strangers:
            raise ProtocolError(f"client {self.id}: told of survivors {strangers} that never shared keys with it")
        unknown = sorted(dropped - set(self.held) - {self.id})
        if unknown:
            raise ProtocolError(f"client {self.id}: told of dropped clients {unknown} whose shares it never received")
        if len(survivors) < t:
            raise ProtocolError(
                f"client {self.id}: told of {len(survivors)} survivors in its neighbourhood (itself included), "
                f"below the threshold {t}"
            )


# ---- server -----------------------------------------------------------------------------------
@dataclass
class SecAggServer:
    """The server's side of one protocol instance: routes messages, validates every field of every
    message before use, and decodes the sum of the survivors' vectors. It never sees an individual
    unmasked vector; a client's bad message makes it reject that client, never raise."""

    participants: list[int]
    neighbours: dict[int, list[int]]
    threshold: int
    vector_length: int
    ring_bits: int = 64
    round_id: bytes = field(default_factory=lambda: os.urandom(16))
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why it was treated as dropped

    def __post_init__(self) -> None:
        ids = list(self.participants)
        if not all(_is_id(c) for c in ids) or len(set(ids)) != len(ids) or not ids:
            raise ConfigError("secure aggregation: participants must be distinct integer ids")
        self._ids = set(ids)
        for c in ids:
            ns = list(self.neighbours.get(c, ()))
            if c in ns or not set(ns) <= self._ids or len(set(ns)) != len(ns):
                raise ConfigError(f"secure aggregation: client {c}'s neighbours {ns} are not other participants")
            if any(c not in self.neighbours[j] for j in ns):
                raise ConfigError(f"secure aggregation: the neighbour graph is not symmetric at client {c}")
        self._holders = {c: sorted({*self.neighbours[c], c}) for c in ids}
        self._position = {c: {h: i for i, h in enumerate(hs)} for c, hs in self._holders.items()}
        for c, hs in self._holders.items():
            if not len(hs) < 2 * self.threshold <= 2 * len(hs):
                raise ConfigError(
                    f"secure.threshold: {self.threshold} is not a strict majority of client {c}'s {len(hs)} "
                    "holders (its clients would refuse it)"
                )
        self._stage = 0
        self.recovered_seeds: dict[int, bytes] = {}  # what the server learned: survivors' self-mask seeds
        self.recovered_keys: dict[int, bytes] = {}  # and dropped clients' mask secret keys

    # ---- validation ----------------------------------------------------------------------------
    def _advance(self, step: int, name: str) -> None:
        if self._stage != step:
            raise ProtocolError(f"secure aggregation server: {name} called out of order")
        self._stage = step + 1

    def _reject(self, client: int, why: str) -> None:
        if client not in self.rejected:
            log.warning("secure aggregation: rejected client %d: %s", client, why)
            self.rejected[client] = why

    def _messages(self, msgs, cls: type, expected: set[int]) -> dict[int, object]:
        """The phase's messages by sender, each of the right type and round from an expected sender,
        one per sender; the senders of anything else are rejected (a message naming no participant is
        logged and ignored)."""
        if not isinstance(msgs, (list, tuple)):
            log.warning("secure aggregation: a phase delivered %s, not a list of messages", type(msgs).__name__)
            msgs = []
        seen: dict[int, object] = {}
        twice: set[int] = set()
        for m in msgs:
            sender = getattr(m, "sender", None)
            if not _is_id(sender) or sender not in self._ids:
                log.warning("secure aggregation: ignored a %s from %r, not a participant", type(m).__name__, sender)
                continue
            if not isinstance(m, cls):
                self._reject(sender, f"a {type(m).__name__} where a {cls.__name__} was expected")
            elif not isinstance(m.round_id, bytes) or m.round_id != self.round_id:
                self._reject(sender, "a message of another protocol round (replayed?)")
            elif sender not in expected:
                self._reject(sender, "a message out of turn")
            elif sender in seen:
                twice.add(sender)
            else:
                seen[sender] = m
        for sender in sorted(twice):
            self._reject(sender, "two messages in one phase")
        return {s: m for s, m in seen.items() if s not in self.rejected}

    def holders(self, client: int) -> list[int]:
        return self._holders[client]

    # ---- the phases -----------------------------------------------------------------------------
    def setup(self) -> dict[int, Setup]:
        self._advance(0, "setup")
        return {
            c: Setup(self.round_id, c, tuple(self.neighbours[c]), self.threshold, self.vector_length, self.ring_bits)
            for c in self.participants
        }

    def collect_keys(self, msgs: list[AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        self._advance(1, "collect_keys")
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.commitments: dict[int, bytes] = {}
        probe = P.new_key_pair()[0]  # one ephemeral key for every trial exchange
        for c, m in self._messages(msgs, AdvertiseKeys, self._ids).items():
            keys = (m.cipher_key, m.mask_key)
            if not all(P.valid_public_key(k, probe) and P.canonical_public_key(k) for k in keys) or keys[0] == keys[1]:
                self._reject(c, "public keys that are not two distinct, canonical X25519 keys one can agree with")
                continue
            if not isinstance(m.seed_commitment, bytes) or len(m.seed_commitment) != P.COMMITMENT_BYTES:
                self._reject(c, "a seed commitment that is not 32 bytes")
                continue
            self.keys[c] = keys
            self.commitments[c] = m.seed_commitment
        owners: dict[bytes, list[int]] = {}
        for c, keys in self.keys.items():
            for k in keys:
                owners.setdefault(k, []).append(c)
        for cs in owners.values():  # a copied key: every holder of it leaves (a copier costs itself too)
            for c in cs if len(cs) > 1 else ():
                self._reject(c, "a public key another participant advertised too")
                self.keys.pop(c, None)
                self.commitments.pop(c, None)
        self.u1 = set(self.keys)
        return {
            c: NeighbourKeys(self.round_id, c, {j: self.keys[j] for j in self.neighbours[c] if j in self.u1})
            for c in sorted(self.u1)
        }

    def collect_shares(self, msgs: list[EncryptedShares]) -> dict[int, SharesForYou]:
        self._advance(2, "collect_shares")
        self.routes: dict[int, dict[int, bytes]] = {c: {} for c in self.u1}
        u2 = set()
        for c, m in self._messages(msgs, EncryptedShares, self.u1).items():
            wanted = {j for j in self.neighbours[c] if j in self.u1}
            cts = m.ciphertexts
            if not _is_id_map(cts, lambda v: isinstance(v, bytes) and len(v) == CIPHERTEXT_BYTES):
                self._reject(c, f"shares that are not {CIPHERTEXT_BYTES}-byte ciphertexts by integer holder")
                continue
            if set(cts) != wanted:
                self._reject(c, f"shares for {sorted(cts)}, expected {sorted(wanted)}")
                continue
            u2.add(c)
            for holder, ct in cts.items():
                self.routes[holder][c] = ct
        self.u2 = u2
        return {
            c: SharesForYou(self.round_id, c, {s: ct for s, ct in self.routes[c].items() if s in u2})
            for c in sorted(u2)
        }

    def collect_masked(self, msgs: list[MaskedInput]) -> dict[int, UnmaskRequest]:
        self._advance(3, "collect_masked")
        self.masked: dict[int, np.ndarray] = {}
        accusations: dict[int, tuple[int, ...]] = {}
        for c, m in self._messages(msgs, MaskedInput, self.u2).items():
            y = m.masked
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (self.vector_length,):
                self._reject(
                    c,
                    f"a masked input of shape {getattr(y, 'shape', None)} / "
                    f"{getattr(y, 'dtype', None)}, expected ({self.vector_length},) uint64",
                )
                continue
            if self.ring_bits < 64 and bool((y >> np.uint64(self.ring_bits)).any()):
                self._reject(c, f"a masked input outside the ring Z_2^{self.ring_bits}")
                continue
            accused = m.rejected
            if not _is_ids(accused) or not set(accused) <= set(self.routes[c]) - {c}:
                # only a neighbour whose shares this client was routed can fail authentication at it
                self._reject(c, f"an accusation of {accused!r}, not neighbours whose shares it was sent")
                continue
            if accused:
                accusations[c] = tuple(accused)
            self.masked[c] = y
        for accuser, accused in sorted(accusations.items()):
            # an accusation costs the accuser its place: a colluder cannot eject honest clients for free
            for a in accused:
                self._reject(a, f"its shares failed authentication at client {accuser}")
                self.masked.pop(a, None)
            self._reject(accuser, f"it accused clients {list(accused)} (an accuser drops out with the accused)")
            self.masked.pop(accuser, None)
        self.u3 = set(self.masked)
        if not self.u3:
            raise SecureAggregationError("secure aggregation: no client delivered a masked input")
        self.dropped = {d for d in self.u2 - self.u3 if any(c in self.u3 for c in self.neighbours[d])}
        for owner in sorted(self.u3 | self.dropped):  # fail now, before any share is revealed
            answering = [h for h in self._holders[owner] if h in self.u3]
            if len(answering) < self.threshold:
                what = "self-mask seed" if owner in self.u3 else "mask key"
                raise SecureAggregationError(
                    f"secure aggregation: only {len(answering)} survivors hold shares of client {owner}'s {what}, "
                    f"below the threshold {self.threshold}"
                )
        self.requests = {}
        for c in sorted(self.u3):
            mine = set(self._holders[c])
            self.requests[c] = UnmaskRequest(
                self.round_id, c, tuple(sorted(self.u3 & mine)), tuple(sorted(self.dropped & mine))
            )
        return dict(self.requests)

    def collect_unmask(self, msgs: list[UnmaskShares]) -> np.ndarray:
        self._advance(4, "collect_unmask")
        seeds: dict[int, dict[int, bytes]] = {c: {} for c in self.u3}
        keys: dict[int, dict[int, bytes]] = {d: {} for d in self.dropped}
        for c, m in self._messages(msgs, UnmaskShares, self.u3).items():
            asked = self.requests[c]
            if not (_is_id_map(m.seed_shares, _is_share) and _is_id_map(m.key_shares, _is_share)):
                self._reject(c, f"unmasking shares that are not {shamir.SHARE_BYTES}-byte field elements by client id")
                continue
            if not (set(m.seed_shares) <= set(asked.survivors) and set(m.key_shares) <= set(asked.dropped)):
                self._reject(c, "unmasking shares of clients it was not asked about")
                continue
            for owner, share in m.seed_shares.items():
                seeds[owner][self._position[owner][c]] = share
            for owner, share in m.key_shares.items():
                keys[owner][self._position[owner][c]] = share
        total = np.zeros(self.vector_length, dtype=np.uint64)
        for c in sorted(self.u3):
            total = total + self.masked[c]
        for owner in sorted(seeds):
            seed = self._recover(owner, seeds[owner], "self-mask seed")
            if P.commit(seed, _commitment_context(self.round_id, owner)) != self.commitments[owner]:
                raise SecureAggregationError(
                    f"secure aggregation: the shares of client {owner}'s self-mask seed decode to a seed that "
                    "does not match its commitment (too many wrong shares)"
                )
            self.recovered_seeds[owner] = seed
            total = total - P.prg(seed, self.vector_length, self.ring_bits)
        for owner in sorted(keys):
            raw = self._recover(owner, keys[owner], "mask key")
            secret = P.private_from_bytes(raw)
            if not P.private_matches(secret, self.keys[owner][1]):
                raise SecureAggregationError(
                    f"secure aggregation: the shares of dropped client {owner}'s mask key decode to a key that "
                    "does not match its advertised public key (too many wrong shares)"
                )
            self.recovered_keys[owner] = raw
            for c in self.neighbours[owner]:
                if c not in self.u3:
                    continue
                info = _pair_info(MASK_INFO, self.round_id, owner, c, self.keys[owner][1], self.keys[c][1])
                pairwise = P.prg(P.agree(secret, self.keys[c][1], info), self.vector_length, self.ring_bits)
                # survivor c added sign(c, owner)·PRG; remove it
                total = total - pairwise if _sign(c, owner) > 0 else total + pairwise
        return _mask_mod(total, self.ring_bits)

    def _recover(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        """The secret from its holders' shares, correcting (and rejecting the holders of) wrong ones."""
        if len(shares) < self.threshold:
            raise SecureAggregationError(
                f"secure aggregation: only {len(shares)} clients returned shares of client {owner}'s {what}, "
                f"below the threshold {self.threshold}"
            )
        try:
            secret, wrong = P.recover_secret(shares, self.threshold)
        except shamir.DecodingError as err:
            raise SecureAggregationError(
                f"secure aggregation: the shares of client {owner}'s {what} cannot be decoded ({err})"
            ) from None
        for position in wrong:
            self._reject(self._holders[owner][position], f"a wrong share of client {owner}'s {what}")
        return secret


# ---- an in-memory transport ------------------------------------------------------------------


@dataclass
class Transcript:
    """What one in-memory protocol run delivered: the sum, who survived, the bytes each client sent."""

    total: np.ndarray
    survivors: tuple[int, ...]
    rejected: dict[int, str]
    bytes_sent: dict[int, int]
    client_seconds: dict[int, float] = field(default_factory=dict)  # each client's own computation
    server_seconds: float = 0.0
    aborted: dict[int, str] = field(default_factory=dict)  # clients that refused a phase, and why


def _size(msg) -> int:
    n = 0
    for v in msg.__dict__.values():
        if isinstance(v, bytes):
            n += len(v)
        elif isinstance(v, np.ndarray):
            n += v.nbytes
        elif isinstance(v, dict):
            n += sum(len(x) if isinstance(x, bytes) else 64 for x in v.values())
    return n


#: the server's step on each phase's answers (the phase sequence every transport runs: :func:`run_instances`)
COLLECT = {
    "advertise": "collect_keys",
    "share": "collect_shares",
    "masked": "collect_masked",
    "unmask": "collect_unmask",
}

Deliver = Callable[[str, dict], dict]


def run_instances(
    servers: dict, deliver: Deliver, timed: Callable | None = None, resume: dict | None = None
) -> tuple[dict, dict]:
    """Run protocol instances together, one phase at a time — the sequence written once, whatever
    carries the messages. ``deliver(phase, inbox)`` takes each instance's messages to its clients
    (``{key: {client: message}}``) and returns their answers (``{key: [answer, …]}``): in memory
    (:func:`run_in_memory`, the simulator's aggregator) or as Message round trips (Flower). ``resume``:
    ``{key: (phase, messages)}`` for instances whose earlier phases already ran (set up ahead of their
    exchange): they join at ``phase`` with those messages. An instance whose server step raises
    :class:`SecureAggregationError` stops there; the others go on.
    Returns ``({key: decoded sum}, {key: the error that stopped it})``."""
    step = timed or (lambda fn, *args: fn(*args))
    order = list(COLLECT)
    resume = resume or {}
    start = {key: order.index(resume[key][0]) if key in resume else 0 for key in servers}
    inbox = {key: resume[key][1] if key in resume else step(server.setup) for key, server in servers.items()}
    failed: dict = {}
    for at, (phase, collect) in enumerate(COLLECT.items()):
        now = {key: messages for key, messages in inbox.items() if start[key] <= at}
        if not now:
            continue
        answers = deliver(phase, now)
        for key in now:
            try:
                inbox[key] = step(getattr(servers[key], collect), answers.get(key, []))
            except SecureAggregationError as err:
                failed[key] = err
                del inbox[key]
    return inbox, failed


class InMemoryClients:
    """The clients of in-process protocol instances: ``deliver`` runs each client's step on its
    message, as a network transport would carry it. ``drops``: per instance, a client and the phase it
    disappears before (a name in :data:`PHASES`); a client that refuses a phase (a
    :class:`~pfpl.errors.PfplError`) is logged and leaves the instance, as a Flower node leaves it out
    of its reply; ``meddle(phase, messages) -> messages`` may alter what reaches the server (tests)."""

    STEPS = {
        "advertise": "setup",
        "share": "share_keys",
        "masked": "masked_input",
        "unmask": "unmask",
    }

    def __init__(self, vectors: dict, drops: dict | None = None, meddle=None):
        self.clients = {key: {c: SecAggClient(c, v) for c, v in vs.items()} for key, vs in vectors.items()}
        self.drops = drops or {}
        self.meddle = meddle
        self.sent = {key: {c: 0 for c in cs} for key, cs in self.clients.items()}
        self.busy = {key: {c: 0.0 for c in cs} for key, cs in self.clients.items()}
        self.aborted: dict = {key: {} for key in self.clients}

    def _alive(self, key, phase: str) -> list[int]:
        order, drops = PHASES.index(phase), self.drops.get(key, {})
        return [
            c
            for c in sorted(self.clients[key])
            if c not in self.aborted[key] and (c not in drops or PHASES.index(drops[c]) > order)
        ]

    def deliver(self, phase: str, inbox: dict) -> dict:
        out = {}
        for key, messages in inbox.items():
            answers = []
            for c in self._alive(key, phase):
                if c not in messages:
                    continue
                start = time.perf_counter()
                try:
                    answers.append(getattr(self.clients[key][c], self.STEPS[phase])(messages[c]))
                except PfplError as err:
                    log.warning("secure aggregation: client %d left at %s: %s", c, phase, err)
                    self.aborted[key][c] = str(err)
                self.busy[key][c] += time.perf_counter() - start
            for m in answers:
                self.sent[key][m.sender] += _size(m)
            out[key] = self.meddle(phase, answers) if self.meddle else answers
        return out


def run_in_memory(
    vectors: dict[int, np.ndarray],
    threshold: int,
    neighbours: dict[int, list[int]],
    ring_bits: int = 64,
    drops: dict[int, str] | None = None,
    meddle=None,
) -> Transcript:
    """Run one protocol instance between in-process clients and a server (:class:`InMemoryClients`
    through :func:`run_instances`); fewer than t answers where t are needed raise one
    :class:`SecureAggregationError`."""
    length = len(next(iter(vectors.values())))
    server = SecAggServer(sorted(vectors), neighbours, threshold, length, ring_bits)
    clients = InMemoryClients({0: vectors}, {0: drops or {}}, meddle)
    server_time = [0.0]

    def timed(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        server_time[0] += time.perf_counter() - start
        return out

    totals, failed = run_instances({0: server}, clients.deliver, timed)
    if 0 in failed:
        raise failed[0]
    return Transcript(
        totals[0],
        tuple(sorted(server.u3)),
        dict(server.rejected),
        clients.sent[0],
        clients.busy[0],
        server_time[0],
        dict(clients.aborted[0]),
    )
