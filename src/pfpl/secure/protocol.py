"""SecAgg / SecAgg+ (Bonawitz et al. CCS 2017; Bell et al. CCS 2020) as a client and a server state
machine that exchange plain messages — the bytes and arrays a network transport carries.

One protocol instance sums the vectors (elements of Z_{2^k}) of a set of participants:

0. the server sends each participant a :class:`Setup` (round id, its neighbours, threshold t);
1. each client advertises two X25519 public keys (:class:`AdvertiseKeys`): one to encrypt shares, one
   to agree pairwise masks; the server forwards its neighbours' keys (:class:`NeighbourKeys`);
2. each client Shamir-shares (t of its neighbourhood + itself) its self-mask seed and its mask secret
   key, encrypts each holder's shares with an AEAD keyed by their X25519 agreement and bound to the
   round, sender and recipient (:class:`EncryptedShares`); the server routes them (:class:`SharesForYou`);
3. each client sends its vector masked with PRG(self seed) and ±PRG(pairwise key) for every
   neighbour that shared (:class:`MaskedInput`), and names senders whose shares failed authentication;
4. the server names the survivors (masked input received) and the dropped (shared keys, no input);
   each client returns self-seed shares of survivors and key shares of the dropped, never both for
   one client (:class:`UnmaskShares`); the server rebuilds the seeds and keys, removes the masks and
   obtains the sum of the survivors' vectors.

A message of the wrong round, sender, shape, length or ring, or a share that fails
authentication, is rejected with a logged reason naming the client, who is then treated as dropped.
Fewer than t answers where t are needed fails the instance with one :class:`SecureAggregationError`.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from pfpl.errors import PfplError, ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure import shamir

log = logging.getLogger(__name__)

SHARE_INFO = b"pfpl-secagg/share"
MASK_INFO = b"pfpl-secagg/mask"


class SecureAggregationError(PfplError):
    """A secure aggregation that cannot complete (too few clients answered)."""


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
    rejected: tuple[int, ...] = ()  # senders whose shares failed authentication


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


def _nonce(sender: int, recipient: int) -> bytes:
    return _ids(sender, recipient) + b"\x00" * 4


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _mask_mod(x: np.ndarray, ring_bits: int) -> np.ndarray:
    return x & np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else x


# ---- client -----------------------------------------------------------------------------------
class SecAggClient:
    """One client's side of one protocol instance, holding its (already encoded) ring vector."""

    def __init__(self, client: int, vector: np.ndarray):
        self.id = client
        self.vector = np.asarray(vector, dtype=np.uint64)
        self.setup_msg: Setup | None = None
        self.shared_with: tuple[int, ...] = ()  # neighbours that shared keys with us (U2 ∩ N)
        self.held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (seed share, key share) held for it

    def _check(self, round_id: bytes, recipient: int) -> None:
        if self.setup_msg is not None and round_id != self.setup_msg.round_id:
            raise ProtocolError(f"client {self.id}: a message of another protocol round")
        if recipient != self.id:
            raise ProtocolError(f"client {self.id}: a message addressed to client {recipient}")

    def setup(self, msg: Setup) -> AdvertiseKeys:
        self._check(msg.round_id, msg.recipient)
        if len(self.vector) != msg.vector_length:
            raise ProtocolError(f"client {self.id}: vector of length {len(self.vector)}, not {msg.vector_length}")
        self.setup_msg = msg
        self.cipher_sk, cipher_pk = P.new_key_pair()
        self.mask_sk, mask_pk = P.new_key_pair()
        self.seed = os.urandom(P.SEED_BYTES)
        return AdvertiseKeys(msg.round_id, self.id, cipher_pk, mask_pk)

    @property
    def holders(self) -> list[int]:
        """Who holds shares of this client's secrets: its neighbours and itself, sorted."""
        return sorted({*self.setup_msg.neighbours, self.id})

    def share_keys(self, msg: NeighbourKeys) -> EncryptedShares:
        self._check(msg.round_id, msg.recipient)
        s = self.setup_msg
        self.peer_keys = dict(msg.keys)
        present = [h for h in self.holders if h == self.id or h in self.peer_keys]
        if len(present) < s.threshold:
            raise SecureAggregationError(
                f"client {self.id}: only {len(present)} of its neighbourhood advertised keys, "
                f"below the threshold {s.threshold}"
            )
        seed_shares = P.split_secret(self.seed, s.threshold, len(self.holders))
        key_shares = P.split_secret(P.private_bytes(self.mask_sk), s.threshold, len(self.holders))
        out = {}
        for pos, holder in enumerate(self.holders):
            if holder not in present:
                continue
            plaintext = seed_shares[pos] + key_shares[pos]
            if holder == self.id:
                self.held[self.id] = (seed_shares[pos], key_shares[pos])
                continue
            key = P.agree(self.cipher_sk, self.peer_keys[holder][0], SHARE_INFO + s.round_id)
            out[holder] = P.encrypt(key, plaintext, s.round_id + _ids(self.id, holder), _nonce(self.id, holder))
        return EncryptedShares(s.round_id, self.id, out)

    def masked_input(self, msg: SharesForYou) -> MaskedInput:
        self._check(msg.round_id, msg.recipient)
        s = self.setup_msg
        rejected = []
        for sender, ciphertext in msg.ciphertexts.items():
            if sender not in self.peer_keys:
                rejected.append(sender)
                log.warning(
                    "secure aggregation: client %d got shares from %d, not a neighbour; rejected", self.id, sender
                )
                continue
            try:
                key = P.agree(self.cipher_sk, self.peer_keys[sender][0], SHARE_INFO + s.round_id)
                plain = P.decrypt(key, ciphertext, s.round_id + _ids(sender, self.id), _nonce(sender, self.id))
            except P.AuthenticationError:
                rejected.append(sender)
                log.warning(
                    "secure aggregation: share from client %d to client %d failed authentication; "
                    "treating client %d as dropped",
                    sender,
                    self.id,
                    sender,
                )
                continue
            half = len(plain) // 2
            self.held[sender] = (plain[:half], plain[half:])
        self.shared_with = tuple(sorted(msg.ciphertexts))  # the server's U2 ∩ N: mask with every one of them
        y = self.vector + P.prg(self.seed, s.vector_length, s.ring_bits)
        for j in self.shared_with:
            pairwise = (
                P.prg(P.agree(self.mask_sk, self.peer_keys[j][1], MASK_INFO + s.round_id), s.vector_length, s.ring_bits)
                if j in self.peer_keys
                else None
            )
            if pairwise is None:
                continue
            y = y + pairwise if _sign(self.id, j) > 0 else y - pairwise
        return MaskedInput(s.round_id, self.id, _mask_mod(y, s.ring_bits), tuple(sorted(rejected)))

    def unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        self._check(msg.round_id, msg.recipient)
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        if survivors & dropped:
            raise ProtocolError(
                f"client {self.id}: asked to reveal both shares of clients {sorted(survivors & dropped)}"
            )
        allowed = set(self.shared_with) | {self.id}
        if not (survivors | dropped) <= allowed | set(self.held):
            raise ProtocolError(f"client {self.id}: asked about clients that never shared keys with it")
        seeds = {i: self.held[i][0] for i in survivors if i in self.held}
        keys = {i: self.held[i][1] for i in dropped if i in self.held}
        return UnmaskShares(msg.round_id, self.id, seeds, keys)


# ---- server -----------------------------------------------------------------------------------
@dataclass
class SecAggServer:
    """The server's side of one protocol instance: routes messages, validates them, and decodes the
    sum of the survivors' vectors. It never sees an individual unmasked vector."""

    participants: list[int]
    neighbours: dict[int, list[int]]
    threshold: int
    vector_length: int
    ring_bits: int = 64
    round_id: bytes = field(default_factory=lambda: os.urandom(16))
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why it was treated as dropped

    def _reject(self, client: int, why: str) -> None:
        if client not in self.rejected:
            log.warning("secure aggregation: rejected client %d: %s", client, why)
            self.rejected[client] = why

    def _valid(self, msg, expected: set[int]) -> bool:
        if msg.round_id != self.round_id:
            self._reject(msg.sender, "a message of another protocol round (replayed?)")
            return False
        if msg.sender not in expected:
            self._reject(msg.sender, "a message out of turn")
            return False
        return True

    def __post_init__(self) -> None:
        self._holders = {c: sorted({*self.neighbours[c], c}) for c in self.participants}
        self._position = {c: {h: i for i, h in enumerate(hs)} for c, hs in self._holders.items()}

    def holders(self, client: int) -> list[int]:
        return self._holders[client]

    def setup(self) -> dict[int, Setup]:
        return {
            c: Setup(self.round_id, c, tuple(self.neighbours[c]), self.threshold, self.vector_length, self.ring_bits)
            for c in self.participants
        }

    def collect_keys(self, msgs: list[AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        for m in msgs:
            if not self._valid(m, set(self.participants)):
                continue
            if len(m.cipher_key) != 32 or len(m.mask_key) != 32 or m.cipher_key == m.mask_key:
                self._reject(m.sender, "public keys of the wrong length")
                continue
            self.keys[m.sender] = (m.cipher_key, m.mask_key)
        self.u1 = set(self.keys)
        return {
            c: NeighbourKeys(self.round_id, c, {j: self.keys[j] for j in self.neighbours[c] if j in self.u1})
            for c in sorted(self.u1)
        }

    def collect_shares(self, msgs: list[EncryptedShares]) -> dict[int, SharesForYou]:
        self.routes: dict[int, dict[int, bytes]] = {c: {} for c in self.u1}
        u2 = set()
        for m in msgs:
            if not self._valid(m, self.u1):
                continue
            wanted = {j for j in self.neighbours[m.sender] if j in self.u1}
            if set(m.ciphertexts) != wanted or any(not isinstance(v, bytes) for v in m.ciphertexts.values()):
                self._reject(m.sender, f"shares for {sorted(m.ciphertexts)}, expected {sorted(wanted)}")
                continue
            u2.add(m.sender)
            for holder, ct in m.ciphertexts.items():
                self.routes[holder][m.sender] = ct
        self.u2 = u2
        return {
            c: SharesForYou(self.round_id, c, {s: ct for s, ct in self.routes[c].items() if s in u2})
            for c in sorted(u2)
        }

    def collect_masked(self, msgs: list[MaskedInput]) -> dict[int, UnmaskRequest]:
        self.masked: dict[int, np.ndarray] = {}
        bad_senders: set[int] = set()
        for m in msgs:
            if not self._valid(m, self.u2):
                continue
            y = m.masked
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (self.vector_length,):
                self._reject(
                    m.sender,
                    f"a masked input of shape {getattr(y, 'shape', None)} / "
                    f"{getattr(y, 'dtype', None)}, expected ({self.vector_length},) uint64",
                )
                continue
            if self.ring_bits < 64 and bool((y >> np.uint64(self.ring_bits)).any()):
                self._reject(m.sender, f"a masked input outside the ring Z_2^{self.ring_bits}")
                continue
            self.masked[m.sender] = y
            for s in m.rejected:
                self._reject(s, f"its shares failed authentication at client {m.sender}")
                bad_senders.add(s)
        for s in bad_senders:
            self.masked.pop(s, None)
        self.u3 = set(self.masked)
        if not self.u3:
            raise SecureAggregationError("secure aggregation: no client delivered a masked input")
        dropped = self.u2 - self.u3
        requests = {}
        for c in sorted(self.u3):
            mine = set(self._holders[c])
            requests[c] = UnmaskRequest(self.round_id, c, tuple(sorted(self.u3 & mine)), tuple(sorted(dropped & mine)))
        return requests

    def collect_unmask(self, msgs: list[UnmaskShares]) -> np.ndarray:
        seeds: dict[int, dict[int, bytes]] = {c: {} for c in self.u3}
        keys: dict[int, dict[int, bytes]] = {c: {} for c in self.u2 - self.u3}
        for m in msgs:
            if not self._valid(m, self.u3):
                continue
            for owner, share in m.seed_shares.items():
                if owner in seeds and len(share) == shamir.SHARE_BYTES:
                    seeds[owner][self._position[owner][m.sender]] = share
            for owner, share in m.key_shares.items():
                if owner in keys and len(share) == shamir.SHARE_BYTES:
                    keys[owner][self._position[owner][m.sender]] = share
        total = np.zeros(self.vector_length, dtype=np.uint64)
        for c in self.u3:
            total = total + self.masked[c]
        for owner, shares in seeds.items():
            if len(shares) < self.threshold:
                raise SecureAggregationError(
                    f"secure aggregation: only {len(shares)} clients returned shares of client {owner}'s mask seed, "
                    f"below the threshold {self.threshold}"
                )
            total = total - P.prg(P.combine_secret(shares), self.vector_length, self.ring_bits)
        for owner, shares in keys.items():
            survivors = [c for c in self.neighbours[owner] if c in self.u3]
            if not survivors:
                continue
            if len(shares) < self.threshold:
                raise SecureAggregationError(
                    f"secure aggregation: only {len(shares)} clients returned shares of dropped client {owner}'s "
                    f"mask key, below the threshold {self.threshold}"
                )
            secret = P.private_from_bytes(P.combine_secret(shares))
            for c in survivors:
                pairwise = P.prg(
                    P.agree(secret, self.keys[c][1], MASK_INFO + self.round_id), self.vector_length, self.ring_bits
                )
                # survivor c added sign(c, owner)·PRG; remove it
                total = total - pairwise if _sign(c, owner) > 0 else total + pairwise
        return _mask_mod(total, self.ring_bits)


# ---- an in-memory transport ------------------------------------------------------------------
#: the phases a client can drop out before: 1 advertise keys, 2 share keys, 3 masked input, 4 unmasking
PHASES = ("advertise", "share", "masked", "unmask")


@dataclass
class Transcript:
    """What one in-memory protocol run delivered: the sum, who survived, the bytes each client sent."""

    total: np.ndarray
    survivors: tuple[int, ...]
    rejected: dict[int, str]
    bytes_sent: dict[int, int]
    client_seconds: dict[int, float] = field(default_factory=dict)  # each client's own computation
    server_seconds: float = 0.0


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


def run_in_memory(
    vectors: dict[int, np.ndarray],
    threshold: int,
    neighbours: dict[int, list[int]],
    ring_bits: int = 64,
    drops: dict[int, str] | None = None,
    meddle=None,
) -> Transcript:
    """Run one protocol instance between in-process clients and a server, passing each message as a
    network transport would. ``drops`` maps a client to the phase it disappears before (a name in
    :data:`PHASES`); ``meddle(phase, messages) -> messages`` may alter what reaches the server (tests)."""
    drops = drops or {}
    clients = {c: SecAggClient(c, v) for c, v in vectors.items()}
    length = len(next(iter(vectors.values())))
    server = SecAggServer(sorted(clients), neighbours, threshold, length, ring_bits)
    sent = {c: 0 for c in clients}
    busy = {c: 0.0 for c in clients}
    server_time = [0.0]

    def alive(phase: str) -> list[int]:
        order = PHASES.index(phase)
        return [c for c in sorted(clients) if c not in drops or PHASES.index(drops[c]) > order]

    def on_clients(phase: str, step, inbox: dict) -> list:
        msgs = []
        for c in alive(phase):
            if c in inbox:
                start = time.perf_counter()
                msgs.append(step(clients[c], inbox[c]))
                busy[c] += time.perf_counter() - start
        for m in msgs:
            sent[m.sender] += _size(m)
        return meddle(phase, msgs) if meddle else msgs

    def on_server(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        server_time[0] += time.perf_counter() - start
        return out

    setups = on_server(server.setup)
    keys = on_server(server.collect_keys, on_clients("advertise", SecAggClient.setup, setups))
    routed = on_server(server.collect_shares, on_clients("share", SecAggClient.share_keys, keys))
    requests = on_server(server.collect_masked, on_clients("masked", SecAggClient.masked_input, routed))
    total = on_server(server.collect_unmask, on_clients("unmask", SecAggClient.unmask, requests))
    return Transcript(total, tuple(sorted(server.u3)), dict(server.rejected), sent, busy, server_time[0])
