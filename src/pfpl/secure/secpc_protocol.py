"""SecPC (:mod:`pfpl.secure.secpc`) as a message protocol: one state machine per client, holding only
its own row, and a server driver that reaches the clients only through ``deliver`` — the shape of
:mod:`pfpl.secure.protocol` (SecAgg+), so the simulator and a Flower transport run the same code.

Phases (``deliver(phase, {client: request}) -> {client: reply}``; every field is a bytes value, an
int, a list of bytes or a 1-/2-D int64 numpy array, so a Flower RecordDict carries it as it is):

``keys``
    request ``clustering`` (16 random bytes naming this clustering), ``clients`` (int64 [W]: the
    sorted ids taking part), ``settings`` (int64 [7]: :func:`settings_vector`, checked against the
    client's own: a server cannot lower T or change the projection); reply ``public_key`` (32 bytes:
    a fresh X25519 key for this clustering).
``share``
    request ``clients`` (int64 [W']: those whose keys the server accepted, sorted — the LCC workers,
    worker j at position j), ``public_keys`` (list of W' 32-byte keys, aligned); reply
    ``recipients`` (int64 [W'−1]: every other worker, sorted) and ``ciphertexts`` (aligned list): the
    client's coded row for that worker (three primes × w field elements, little-endian uint32),
    ChaCha20-Poly1305-encrypted under the X25519 + HKDF key of the pair, the associated data binding
    the clustering, both ids, the settings, the worker list and both public keys. Its own coded row
    never leaves it.
``hold``
    request ``senders`` (int64 [S]) and ``ciphertexts`` (aligned list): the rows addressed to this
    client; reply ``held`` (int64: the sorted owners whose rows authenticated, itself included).
    A row that is missing or fails authentication is not held; the server then leaves its owner
    out of the clustering, *and* the holder that reported it (as SecAgg+ drops an accuser), so a
    client cannot eject an honest owner for free. The owners are the clients whose rows every
    remaining holder received.
``evaluate`` (repeated: one per k-means iteration)
    request ``query`` (int, strictly increasing, at most :func:`query_budget` of them),
    ``owners`` (int64 [n]: the owner set, fixed by the first query), ``assignment`` (int64 [n]:
    each owner's cluster, 0..M−1, every cluster non-empty); reply ``query`` (echoed) and
    ``results`` (int64 [3, n·M + M·M]: f_A on the client's share, per prime).

What the server learns: the public keys, the ciphertexts (opaque: it holds no private key), who
holds whose rows, and from the workers' results the decoded partial squared distances of every
owner to every centre and between centres, per slice (exactly what the single-object simulation gave
it before; DESIGN §5 and docs/privacy.md have the leakage profile: over a clustering these pin down
the pairwise distances of the projected rows). It never sees a row, a mask or a coded row. Against
T colluding clients the shares they hold are uniform. The guarantee is against an honest-but-curious
server: with no PKI, a server that substitutes public keys in transit can read the coded rows meant
for the clients it impersonates (as in SecAgg without signatures).

Masks come from :meth:`pfpl.secure.field.Field.random` (a ChaCha20 stream keyed by ``os.urandom``),
never from the settings seed, which is public: the seed only fixes the projection and the k-means
starts.

Robustness (mirroring :mod:`pfpl.secure.protocol`): a client refuses an out-of-order or malformed
request with one :class:`~pfpl.errors.ProtocolError` line (or :class:`ClusteringError` when the
clustering cannot complete) and answers nothing more; the server validates every reply's fields,
shapes, dtypes and ranges, and a bad reply makes that client absent (logged), never a crash. Workers
that stop answering are absent; results beyond the recovery threshold are checked for consistency
(:meth:`pfpl.secure.lcc.LCC.decode_checked`), so a wrong result is excluded or fails the clustering
cleanly, never decodes to a wrong clustering. Too few workers raise one :class:`ClusteringError`.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from pfpl.errors import PfplError, ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure.field import PRIMES, Field, from_residues, to_residues
from pfpl.secure.lcc import LCC, InconsistentResultsError
from pfpl.secure.secpc import (
    Clustering,
    ClusteringError,
    SecPCSettings,
    _indicator,
    _worker,
    adaptive_kmeans,
    project_row,
    quantize,
)

log = logging.getLogger(__name__)

Deliver = Callable[[str, dict[int, dict]], dict[int, dict]]

PHASES = ("keys", "share", "hold", "evaluate")
_STAGES = ("new", *PHASES)
ABORTED = -1
CHANNEL_INFO = b"pfpl-secpc/rows"
ROWS_AD = b"pfpl-secpc/share"
CLUSTERING_ID_BYTES = 16
_MAX_ID = 2**63 - 1
_ELEMENT = np.dtype("<u4")  # a field element on the wire (every prime is below 2^24)


# ---- shared helpers ------------------------------------------------------------------------------
def settings_vector(settings: SecPCSettings) -> np.ndarray:
    """The settings both ends must share, as the ``keys`` request carries them."""
    s = settings
    return np.array(
        [s.projection_dim, s.frac_bits, s.slices, s.privacy, s.seed, s.restarts, s.max_iterations], dtype=np.int64
    )


def query_budget(settings: SecPCSettings) -> int:
    """The most ``evaluate`` queries one clustering needs (each restart: its iterations and one
    final evaluation); a client answers no more."""
    return max(1, settings.restarts) * (settings.max_iterations + 1)


def recovery_threshold(settings: SecPCSettings) -> int:
    return 2 * (settings.slices + settings.privacy - 1) + 1


def width(settings: SecPCSettings) -> int:
    """Columns per slice: the projected row padded to K·w."""
    return -(-settings.projection_dim // settings.slices)


def ciphertext_bytes(settings: SecPCSettings) -> int:
    return len(PRIMES) * width(settings) * _ELEMENT.itemsize + 16


def _pack_ids(*ids: int) -> bytes:
    return struct.pack(f">{len(ids)}q", *ids)


def channel_info(clustering: bytes, a: int, key_a: bytes, b: int, key_b: bytes) -> bytes:
    """HKDF info of the pair's key: the clustering, both ids and both public keys, in id order."""
    (i, ki), (j, kj) = sorted([(a, key_a), (b, key_b)])
    return CHANNEL_INFO + clustering + _pack_ids(i, j) + ki + kj


def rows_associated(
    clustering: bytes, sender: int, recipient: int, settings: np.ndarray, workers: np.ndarray, keys: tuple[bytes, bytes]
) -> bytes:
    """The AEAD's associated data of a coded row: clustering, sender, recipient, the phase, the
    settings, the worker list (whose positions are the LCC points) and both keys as each end saw
    them — a row encoded for another view of the clustering fails authentication."""
    return (
        ROWS_AD
        + clustering
        + _pack_ids(sender, recipient)
        + settings.astype(">i8").tobytes()
        + workers.astype(">i8").tobytes()
        + keys[0]
        + keys[1]
    )


def _nonce(sender: int, recipient: int) -> bytes:
    """Unique per key and direction: each pair's key serves one clustering and one row each way."""
    return b"\x00" * 11 + (b"\x01" if sender < recipient else b"\x02")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_id_array(x: object) -> bool:
    """A 1-D int64 array of sorted, distinct, non-negative ids."""
    return (
        isinstance(x, np.ndarray)
        and x.dtype == np.int64
        and x.ndim == 1
        and bool((x >= 0).all())
        and bool((np.diff(x) > 0).all())
    )


def _is_bytes_list(x: object, n: int, size: int | None = None) -> bool:
    return (
        isinstance(x, (list, tuple))
        and len(x) == n
        and all(isinstance(b, bytes) and (size is None or len(b) == size) for b in x)
    )


def _fields(phase: str, who: str, message: object, names: tuple[str, ...]) -> dict:
    if not isinstance(message, dict) or set(message) != set(names):
        got = sorted(message) if isinstance(message, dict) else type(message).__name__
        raise ProtocolError(f"secure clustering: {who}: a {phase} message with fields {got}, expected {sorted(names)}")
    return message


def message_bytes(message: object) -> int:
    """What a message weighs on the wire (payload only)."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, np.ndarray):
        return message.nbytes
    if isinstance(message, dict):
        return sum(message_bytes(v) for v in message.values())
    if isinstance(message, (list, tuple)):
        return sum(message_bytes(v) for v in message)
    return 8


# ---- client ----------------------------------------------------------------------------------------
class SecPCClient:
    """One client's side of one secure clustering. It holds only its own raw row (the vector before
    projection), projects, quantises and LCC-codes it itself with masks from OS entropy, and trusts
    neither the server nor the other clients: every request is checked, phases run in order
    (``keys``, ``share``, ``hold``, then ``evaluate`` repeatedly), and a refused request leaves it
    aborted. ``n_clients``: the federation's size, the most participants it accepts."""

    def __init__(self, cid: int, row: np.ndarray, settings: SecPCSettings, n_clients: int):
        if not _is_int(cid) or not 0 <= int(cid) <= _MAX_ID:
            raise ValueError(f"a client id is a non-negative integer, not {cid!r}")
        self.id = int(cid)
        self.settings = settings
        self.n_clients = int(n_clients)
        self._row = np.array(row, dtype=np.float64)
        if self._row.ndim != 1 or not np.isfinite(self._row).all():
            raise ValueError(f"client {cid}: its row must be a finite 1-D vector, not of shape {self._row.shape}")
        self._stage = 0
        self._queries = 0
        self._last_query = -1
        self._owners: np.ndarray | None = None
        self._held: dict[int, np.ndarray] = {}  # owner -> its coded row for this worker, [3, w]
        self._stacked: list[np.ndarray] | None = None

    @property
    def stage(self) -> str:
        return "aborted" if self._stage == ABORTED else _STAGES[self._stage]

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"secure clustering: client {self.id}: {why}")

    def handle(self, phase: str, request: dict) -> dict:
        """Answer one request of ``phase``; refused (:class:`ProtocolError`, or :class:`ClusteringError`
        when the clustering cannot complete) out of order, malformed, or after a refusal."""
        if phase not in PHASES:
            raise self._fail(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        step = _STAGES.index(phase)
        repeat = phase == "evaluate" and self._stage == step
        if self._stage != step - 1 and not repeat:
            raise self._fail(
                f"{phase} asked at stage {self.stage!r}; the phases run in the order {', '.join(PHASES)} "
                "(evaluate repeatedly), each other one once"
            )
        try:
            reply = getattr(self, f"_{phase}")(request)
        except Exception:
            self._stage = ABORTED
            raise
        self._stage = step
        return reply

    # ---- keys ------------------------------------------------------------------------------------
    def _keys(self, request: dict) -> dict:
        r = _fields("keys", f"client {self.id}", request, ("clustering", "clients", "settings"))
        cid, clients, settings = r["clustering"], r["clients"], r["settings"]
        if not isinstance(cid, bytes) or len(cid) != CLUSTERING_ID_BYTES:
            raise self._fail(f"a clustering id that is not {CLUSTERING_ID_BYTES} bytes")
        if not _is_id_array(clients) or self.id not in clients:
            raise self._fail("a participant list that is not sorted distinct ids including this client")
        if len(clients) > self.n_clients:
            raise self._fail(f"{len(clients)} participants in a federation of {self.n_clients}")
        mine = settings_vector(self.settings)
        if not (isinstance(settings, np.ndarray) and settings.shape == mine.shape and np.array_equal(settings, mine)):
            raise self._fail(f"settings {settings!r} differ from this client's {mine.tolist()}")
        self._check_enough(len(clients))
        self.clustering = cid
        self.participants = clients.copy()
        self._sk, self.public_key = P.new_key_pair()
        return {"public_key": self.public_key}

    def _check_enough(self, workers: int) -> None:
        need = recovery_threshold(self.settings)
        if workers < need:
            raise ClusteringError(
                f"secure clustering: client {self.id}: {workers} workers, below the recovery threshold {need}; "
                "it shares nothing"
            )

    # ---- share -----------------------------------------------------------------------------------
    def _share(self, request: dict) -> dict:
        r = _fields("share", f"client {self.id}", request, ("clients", "public_keys"))
        workers, keys = r["clients"], r["public_keys"]
        if not _is_id_array(workers) or self.id not in workers or not np.isin(workers, self.participants).all():
            raise self._fail("workers that are not sorted distinct participants including this client")
        if not _is_bytes_list(keys, len(workers)):
            raise self._fail("public keys that are not one byte string per worker")
        me = int(np.flatnonzero(workers == self.id)[0])
        if keys[me] != self.public_key:
            raise self._fail("its own public key altered in the worker list")
        self._check_enough(len(workers))
        s = self.settings
        x = quantize(project_row(self._row, s.projection_dim, s.seed), s.frac_bits)
        w = width(s)
        padded = np.zeros(s.slices * w, dtype=np.int64)
        padded[: len(x)] = x
        slices = padded.reshape(s.slices, w)
        codes = [LCC(Field(p), s.slices, s.privacy, len(workers)) for p in PRIMES]
        # [W, 3, w]: every worker's coded row for every prime; the masks come from OS entropy
        coded = np.stack([code.encode(res) for code, res in zip(codes, to_residues(slices))], axis=1)
        self.workers = workers.copy()
        self._settings_vec = settings_vector(s)
        self._channels: dict[int, bytes] = {}
        self.peer_keys: dict[int, bytes] = {}
        seen = {self.public_key}
        recipients, ciphertexts = [], []
        for pos, j in enumerate(int(v) for v in workers):
            if j == self.id:
                continue
            key = keys[pos]
            if not P.canonical_public_key(key) or key in seen:
                raise self._fail(f"client {j}'s public key is not canonical, or a copy of another's")
            seen.add(key)
            try:
                channel = P.agree(self._sk, key, channel_info(self.clustering, self.id, self.public_key, j, key))
            except P.KeyAgreementError as err:
                raise self._fail(f"no key agreement with client {j} ({err})") from None
            self._channels[j], self.peer_keys[j] = channel, key
            plain = coded[pos].astype(_ELEMENT).tobytes()
            ad = rows_associated(self.clustering, self.id, j, self._settings_vec, workers, (self.public_key, key))
            recipients.append(j)
            ciphertexts.append(P.encrypt(channel, plain, ad, _nonce(self.id, j)))
        self._held = {self.id: coded[me]}
        del self._row  # from here on the client needs only the coded rows it holds
        return {"recipients": np.array(recipients, dtype=np.int64), "ciphertexts": ciphertexts}

    # ---- hold ------------------------------------------------------------------------------------
    def _hold(self, request: dict) -> dict:
        r = _fields("hold", f"client {self.id}", request, ("senders", "ciphertexts"))
        senders, cts = r["senders"], r["ciphertexts"]
        if not _is_id_array(senders) or self.id in senders or not np.isin(senders, self.workers).all():
            raise self._fail("senders that are not sorted distinct other workers")
        if not _is_bytes_list(cts, len(senders)):
            raise self._fail("ciphertexts that are not one byte string per sender")
        w = width(self.settings)
        bound = np.array(PRIMES, dtype=np.int64)[:, None]
        for sender, ct in zip((int(v) for v in senders), cts):
            key = self.peer_keys[sender]
            keys = (key, self.public_key)
            ad = rows_associated(self.clustering, sender, self.id, self._settings_vec, self.workers, keys)
            try:
                plain = P.decrypt(self._channels[sender], ct, ad, _nonce(sender, self.id))
            except P.AuthenticationError:
                log.warning("secure clustering: client %d: the row of client %d failed authentication", self.id, sender)
                continue
            if len(plain) != len(PRIMES) * w * _ELEMENT.itemsize:
                log.warning("secure clustering: client %d: the row of client %d has the wrong length", self.id, sender)
                continue
            row = np.frombuffer(plain, dtype=_ELEMENT).astype(np.int64).reshape(len(PRIMES), w)
            if (row >= bound).any():
                log.warning("secure clustering: client %d: the row of client %d is outside the field", self.id, sender)
                continue
            self._held[sender] = row
        return {"held": np.array(sorted(self._held), dtype=np.int64)}

    # ---- evaluate --------------------------------------------------------------------------------
    def _evaluate(self, request: dict) -> dict:
        r = _fields("evaluate", f"client {self.id}", request, ("query", "owners", "assignment"))
        query, owners, assignment = r["query"], r["owners"], r["assignment"]
        if not _is_int(query) or int(query) <= self._last_query:
            raise self._fail(f"query {query!r} is not an integer above the last one ({self._last_query})")
        if self._queries >= query_budget(self.settings):
            raise self._fail(f"more than {query_budget(self.settings)} queries, the most one clustering needs")
        if self._owners is None:
            if not _is_id_array(owners) or not len(owners) or not set(owners.tolist()) <= set(self._held):
                raise self._fail("owners that are not sorted distinct clients whose rows it holds")
            self._owners = owners.copy()
            self._stacked = [np.stack([self._held[int(o)][q] for o in owners]) for q in range(len(PRIMES))]
        elif not (isinstance(owners, np.ndarray) and np.array_equal(owners, self._owners)):
            raise self._fail("the owner set changed between queries")
        n = len(self._owners)
        if not (isinstance(assignment, np.ndarray) and assignment.dtype == np.int64 and assignment.shape == (n,)):
            raise self._fail(f"an assignment that is not int64 of shape ({n},)")
        if assignment.min() < 0 or assignment.max() >= n or (np.bincount(assignment) == 0).any():
            raise self._fail("an assignment whose clusters are not 0..M−1, each non-empty")
        self._queries += 1
        self._last_query = int(query)
        a = _indicator(assignment, int(assignment.max()) + 1)
        sizes = a.sum(1)
        results = np.stack([_worker(Field(p), share, a, sizes) for p, share in zip(PRIMES, self._stacked)])
        return {"query": int(query), "results": results}


# ---- server ----------------------------------------------------------------------------------------
@dataclass
class SecPCStats:
    """What one secure clustering cost and who took part. ``bytes_per_client``: the mean bytes a client
    sent (its replies); ``client_seconds``: the mean computation per client (filled in by a transport
    that can time its clients, as the in-memory one does); ``server_seconds``: the server's own
    computation; ``rounds``: evaluate queries (LCC rounds)."""

    clients: tuple[int, ...]
    owners: tuple[int, ...] = ()  # whose rows were clustered
    workers: tuple[int, ...] = ()  # the LCC workers (position = evaluation point)
    answering: tuple[int, ...] = ()  # workers that answered the last query
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why it was treated as absent
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_per_client: float = 0.0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    rounds: int = 0


class SecPCServer:
    """The server's side of one secure clustering: sends requests, validates every reply, decides
    the owner set, runs the adaptive k-means on decoded distances. A client's bad reply makes it
    absent; only too few clients raise (:class:`ClusteringError`)."""

    def __init__(self, clients: int | Sequence[int], settings: SecPCSettings, absent: Collection[int] = ()):
        ids = list(range(clients)) if _is_int(clients) else [int(c) for c in clients]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= c <= _MAX_ID for c in ids):
            raise ValueError("secure clustering: the clients must be distinct non-negative integer ids")
        self.ids = sorted(ids)
        self.settings = settings
        self.absent = set(absent)  # never asked to evaluate (their rows still count)
        self.clustering = os.urandom(CLUSTERING_ID_BYTES)
        self.stats = SecPCStats(tuple(self.ids), bytes_sent={c: 0 for c in self.ids})
        self._deliver_seconds = 0.0

    def _reject(self, client: int, why: str) -> None:
        if client not in self.stats.rejected:
            log.warning("secure clustering: client %d is absent: %s", client, why)
            self.stats.rejected[client] = why

    def _exchange(self, deliver: Deliver, phase: str, requests: dict[int, dict]) -> dict[int, dict]:
        """One round trip; replies from clients that were not asked are ignored, and a reply that is
        not a dict rejects its sender."""
        start = time.perf_counter()
        replies = deliver(phase, requests)
        self._deliver_seconds += time.perf_counter() - start
        if not isinstance(replies, dict):
            log.warning("secure clustering: %s delivered a %s, not replies by client", phase, type(replies).__name__)
            return {}
        out = {}
        for c, reply in replies.items():
            if not _is_int(c) or int(c) not in requests:
                log.warning("secure clustering: ignored a %s reply from %r, which was not asked", phase, c)
                continue
            c = int(c)
            self.stats.bytes_sent[c] += message_bytes(reply)
            if not isinstance(reply, dict):
                self._reject(c, f"a {phase} reply that is a {type(reply).__name__}, not a message")
                continue
            out[c] = reply
        return out

    def _valid(self, c: int, phase: str, reply: dict, names: tuple[str, ...]) -> bool:
        try:
            _fields(phase, f"client {c}", reply, names)
        except ProtocolError as err:
            self._reject(c, str(err))
            return False
        return True

    def _fail(self, why: str) -> ClusteringError:
        return ClusteringError(f"secure clustering: {why}")

    # ---- phases ------------------------------------------------------------------------------------
    def _keys(self, deliver: Deliver) -> None:
        clients, settings = np.array(self.ids, dtype=np.int64), settings_vector(self.settings)
        requests = {
            c: {"clustering": self.clustering, "clients": clients.copy(), "settings": settings.copy()} for c in self.ids
        }
        probe = P.new_key_pair()[0]
        keys: dict[int, bytes] = {}
        for c, reply in self._exchange(deliver, "keys", requests).items():
            if not self._valid(c, "keys", reply, ("public_key",)):
                continue
            key = reply["public_key"]
            if not (P.canonical_public_key(key) and P.valid_public_key(key, probe)):
                self._reject(c, "a public key that is not a canonical X25519 key one can agree with")
                continue
            keys[c] = key
        owners: dict[bytes, list[int]] = {}
        for c, key in keys.items():
            owners.setdefault(key, []).append(c)
        for cs in owners.values():  # a copied key: every holder of it leaves
            for c in cs if len(cs) > 1 else ():
                self._reject(c, "a public key another client advertised too")
                keys.pop(c)
        self.keys = dict(sorted(keys.items()))
        self._enough(len(self.keys), "advertised keys")

    def _enough(self, n: int, what: str) -> None:
        need = recovery_threshold(self.settings)
        if n < need:
            raise self._fail(f"{n} clients {what}, below the recovery threshold {need} = 2·(K + T − 1) + 1")

    def _share(self, deliver: Deliver) -> None:
        self.workers = list(self.keys)
        workers = np.array(self.workers, dtype=np.int64)
        keys = list(self.keys.values())
        requests = {c: {"clients": workers.copy(), "public_keys": list(keys)} for c in self.workers}
        size = ciphertext_bytes(self.settings)
        self.routes: dict[int, dict[int, bytes]] = {c: {} for c in self.workers}  # recipient -> sender -> ct
        shared = []
        for c, reply in self._exchange(deliver, "share", requests).items():
            if not self._valid(c, "share", reply, ("recipients", "ciphertexts")):
                continue
            expected = workers[workers != c]
            recipients, cts = reply["recipients"], reply["ciphertexts"]
            if not (isinstance(recipients, np.ndarray) and recipients.dtype == np.int64) or not np.array_equal(
                recipients, expected
            ):
                self._reject(c, f"rows for {recipients!r}, expected one for every other worker {expected.tolist()}")
                continue
            if not _is_bytes_list(cts, len(expected), size):
                self._reject(c, f"rows that are not {len(expected)} ciphertexts of {size} bytes")
                continue
            shared.append(c)
            for j, ct in zip(expected.tolist(), cts):
                self.routes[j][c] = ct
        self.shared = sorted(shared)
        self._enough(len(self.shared), "shared their rows")

    def _hold(self, deliver: Deliver) -> None:
        requests = {}
        for c in self.shared:
            senders = [s for s in self.shared if s != c]
            requests[c] = {
                "senders": np.array(senders, dtype=np.int64),
                "ciphertexts": [self.routes[c][s] for s in senders],
            }
        held: dict[int, set[int]] = {}
        for c, reply in self._exchange(deliver, "hold", requests).items():
            if not self._valid(c, "hold", reply, ("held",)):
                continue
            h = reply["held"]
            if not _is_id_array(h) or c not in h or not set(h.tolist()) <= set(self.shared):
                self._reject(c, "a held list that is not sorted distinct senders including itself")
                continue
            held[c] = set(h.tolist())
        owners = set(self.shared)
        for c, hs in sorted(held.items()):
            missing = set(self.shared) - hs
            if missing:  # the rows lost and the holder that reports it leave the owner set
                log.warning(
                    "secure clustering: client %d holds no row of clients %s; they leave the clustering, "
                    "and so does it as an owner",
                    c,
                    sorted(missing),
                )
                owners -= missing | {c}
        self.owners = sorted(owners)
        self.stats.owners = tuple(self.owners)
        self.stats.workers = tuple(self.workers)
        self.active = [c for c in sorted(held) if c not in self.absent]
        if not self.owners:
            raise self._fail("no client's row reached every holder")
        self._enough(len(self.active), "hold the rows")
        self._query = 0
        self._codes = [LCC(Field(p), self.settings.slices, self.settings.privacy, len(self.workers)) for p in PRIMES]
        self._position = {c: i for i, c in enumerate(self.workers)}

    def distances(self, deliver: Deliver, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One k-means iteration's (D', E') for the owners: one ``evaluate`` round trip, then LCC decoding."""
        assignment = np.asarray(assignment, dtype=np.int64)
        n, m = len(self.owners), int(assignment.max()) + 1
        length = n * m + m * m
        self._query += 1
        owners = np.array(self.owners, dtype=np.int64)
        requests = {
            c: {"query": self._query, "owners": owners.copy(), "assignment": assignment.copy()} for c in self.active
        }
        replies = self._exchange(deliver, "evaluate", requests)
        bound = np.array(PRIMES, dtype=np.int64)[:, None]
        results: dict[int, np.ndarray] = {}
        for c in self.active:
            if c not in replies:
                self._reject(c, f"no result for query {self._query}")
                continue
            if not self._valid(c, "evaluate", replies[c], ("query", "results")):
                continue
            q, res = replies[c]["query"], replies[c]["results"]
            if not _is_int(q) or int(q) != self._query:
                self._reject(c, f"a result for query {q!r}, not {self._query}")
                continue
            if not (isinstance(res, np.ndarray) and res.dtype == np.int64 and res.shape == (len(PRIMES), length)):
                self._reject(
                    c,
                    f"results of shape {getattr(res, 'shape', None)} / {getattr(res, 'dtype', None)}, "
                    f"expected ({len(PRIMES)}, {length}) int64",
                )
                continue
            if (res < 0).any() or (res >= bound).any():
                self._reject(c, "results outside the field")
                continue
            results[c] = res
        decoded = []
        for q, code in enumerate(self._codes):
            by_position = {self._position[c]: r[q] for c, r in results.items()}
            try:
                per_slice, wrong = code.decode_checked(by_position, degree=2)
            except InconsistentResultsError as err:
                raise self._fail(f"inconsistent worker results ({err})") from None
            except PfplError as err:
                raise self._fail(str(err)) from None
            for pos in wrong:
                self._reject(self.workers[pos], "a result inconsistent with the other workers'")
                results.pop(self.workers[pos], None)
            decoded.append(per_slice.sum(0) % code.field.p)
        self.active = [c for c in self.active if c in results]
        self.stats.answering = tuple(self.active)
        self.stats.rounds += 1
        flat = from_residues(decoded, PRIMES, signed=False)
        return flat[: n * m].reshape(n, m), flat[n * m :].reshape(m, m)

    def run(self, deliver: Deliver) -> tuple[Clustering, SecPCStats]:
        start, self._deliver_seconds = time.perf_counter(), 0.0
        self._keys(deliver)
        self._share(deliver)
        self._hold(deliver)
        scale = 2.0 ** (2 * self.settings.frac_bits)
        result = adaptive_kmeans(len(self.owners), lambda a: self.distances(deliver, a), self.settings, scale)
        result.clients = np.array(self.owners, dtype=np.int64)
        self.stats.server_seconds = time.perf_counter() - start - self._deliver_seconds
        self.stats.bytes_per_client = float(np.mean(list(self.stats.bytes_sent.values())))
        return result, self.stats


def run_secpc(
    clients: int | Sequence[int], settings: SecPCSettings, deliver: Deliver, absent: Collection[int] = ()
) -> tuple[Clustering, SecPCStats]:
    """One secure clustering of ``clients`` (a count: ids 0..n−1, or the ids) driven through
    ``deliver(phase, {client: request}) -> {client: reply}`` (the clients that answered): keys →
    share → hold, then the adaptive k-means, each distance query one ``evaluate`` round trip.
    ``absent``: clients known to have left after sharing (never asked to evaluate; their rows still
    count). The clustering's ``assignment`` is for ``clients`` = the owners (``stats.owners``)."""
    return SecPCServer(clients, settings, absent).run(deliver)


# ---- an in-memory transport --------------------------------------------------------------------------
class InMemorySecPC:
    """In-process clients behind a ``deliver``, as a network transport would carry the messages.
    ``absent_workers`` answer every phase but ``evaluate`` (they dropped out after sharing); a client
    that refuses a request (a :class:`~pfpl.errors.PfplError`) is logged and answers nothing more."""

    def __init__(
        self,
        rows: np.ndarray | dict[int, np.ndarray],
        settings: SecPCSettings,
        absent_workers: Collection[int] | None = None,
    ):
        rows = dict(enumerate(rows)) if not isinstance(rows, dict) else rows
        self.clients = {c: SecPCClient(c, r, settings, len(rows)) for c, r in rows.items()}
        self.absent = set(absent_workers or ())
        self.busy = {c: 0.0 for c in self.clients}
        self.aborted: dict[int, str] = {}

    def deliver(self, phase: str, requests: dict[int, dict]) -> dict[int, dict]:
        out = {}
        for c, request in requests.items():
            if c not in self.clients or c in self.aborted or (phase == "evaluate" and c in self.absent):
                continue
            start = time.perf_counter()
            try:
                out[c] = self.clients[c].handle(phase, request)
            except PfplError as err:
                log.warning("secure clustering: client %d left at %s: %s", c, phase, err)
                self.aborted[c] = str(err)
            self.busy[c] += time.perf_counter() - start
        return out


def run_secpc_in_memory(
    features: np.ndarray,
    settings: SecPCSettings,
    secure: bool = True,
    absent_workers: Collection[int] | None = None,
) -> tuple[Clustering, SecPCStats]:
    """The protocol between ``len(features)`` in-process clients (client i holds row i) and the server;
    ``stats.client_seconds`` is the mean computation per client. ``secure=False``: the plaintext
    reference (:func:`pfpl.secure.secpc.cluster`), stats None."""
    if not secure:
        from pfpl.secure.secpc import cluster

        return cluster(features, settings, secure=False)
    transport = InMemorySecPC(np.asarray(features), settings, absent_workers)
    result, stats = run_secpc(sorted(transport.clients), settings, transport.deliver)
    stats.client_seconds = float(np.mean(list(transport.busy.values())))
    return result, stats
