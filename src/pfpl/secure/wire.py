"""The secure-aggregation messages and a client's protocol state as flat fields — integers, bytes and
lists of them — for a transport that carries such values (Flower's ConfigRecord) between processes.
Decoding checks every field's type and never unpickles, so a malformed message from another party
is a :class:`~pfpl.errors.ProtocolError`, not code."""

from __future__ import annotations

import numpy as np

from pfpl.errors import ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure.protocol import (
    ABORTED,
    STAGES,
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    NeighbourKeys,
    SecAggClient,
    Setup,
    SharesForYou,
    UnmaskRequest,
    UnmaskShares,
)

# field kinds: "bytes", "int", "ints" (tuple of ints), "bytes_map" (int -> bytes), "pair_map" (int -> (bytes,
# bytes)), "ring" (a uint64 vector)
SCHEMAS: dict[type, dict[str, str]] = {
    Setup: {
        "round_id": "bytes",
        "recipient": "int",
        "neighbours": "ints",
        "threshold": "int",
        "vector_length": "int",
        "ring_bits": "int",
    },
    AdvertiseKeys: {
        "round_id": "bytes",
        "sender": "int",
        "cipher_key": "bytes",
        "mask_key": "bytes",
        "seed_commitment": "bytes",
    },
    NeighbourKeys: {"round_id": "bytes", "recipient": "int", "keys": "pair_map"},
    EncryptedShares: {"round_id": "bytes", "sender": "int", "ciphertexts": "bytes_map"},
    SharesForYou: {"round_id": "bytes", "recipient": "int", "ciphertexts": "bytes_map"},
    MaskedInput: {"round_id": "bytes", "sender": "int", "masked": "ring", "rejected": "ints"},
    UnmaskRequest: {"round_id": "bytes", "recipient": "int", "survivors": "ints", "dropped": "ints"},
    UnmaskShares: {"round_id": "bytes", "sender": "int", "seed_shares": "bytes_map", "key_shares": "bytes_map"},
}
BY_NAME = {cls.__name__: cls for cls in SCHEMAS}


def _put(out: dict, key: str, kind: str, value) -> None:
    if kind in ("bytes", "int"):
        out[key] = value
    elif kind == "ints":
        out[key] = [int(x) for x in value]
    elif kind == "bytes_map":
        items = sorted(value.items())
        out[f"{key}.ids"], out[f"{key}.values"] = [int(k) for k, _ in items], [v for _, v in items]
    elif kind == "pair_map":
        items = sorted(value.items())
        out[f"{key}.ids"] = [int(k) for k, _ in items]
        out[f"{key}.first"], out[f"{key}.second"] = [a for _, (a, _) in items], [b for _, (_, b) in items]
    elif kind == "ring":
        out[key] = np.asarray(value, dtype="<u8").tobytes()


def _typed(fields: dict, key: str, kind, what: str):
    if key not in fields:
        raise ProtocolError(f"{what}: field {key!r} is missing")
    value = fields[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolError(f"{what}: {key!r} must be an integer")
    if kind is bytes and not isinstance(value, bytes):
        raise ProtocolError(f"{what}: {key!r} must be bytes")
    if kind in (list, "ints", "bytes_list"):
        if not isinstance(value, list):
            raise ProtocolError(f"{what}: {key!r} must be a list")
        inner = int if kind == "ints" else bytes
        if kind is not list and not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise ProtocolError(f"{what}: {key!r} must be a list of {inner.__name__}")
    return value


def _get(fields: dict, key: str, kind: str, what: str):
    if kind == "bytes":
        return _typed(fields, key, bytes, what)
    if kind == "int":
        return int(_typed(fields, key, int, what))
    if kind == "ints":
        return tuple(_typed(fields, key, "ints", what))
    if kind == "ring":
        raw = _typed(fields, key, bytes, what)
        if len(raw) % 8:
            raise ProtocolError(f"{what}: {key!r} is not a whole number of 64-bit elements")
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    ids = _typed(fields, f"{key}.ids", "ints", what)
    if len(set(ids)) != len(ids):  # a dict would silently keep the last of two entries
        raise ProtocolError(f"{what}: {key!r} names one id twice")
    if kind == "bytes_map":
        values = _typed(fields, f"{key}.values", "bytes_list", what)
        if len(values) != len(ids):
            raise ProtocolError(f"{what}: {key!r} has {len(ids)} ids and {len(values)} values")
        return dict(zip(ids, values))
    first = _typed(fields, f"{key}.first", "bytes_list", what)
    second = _typed(fields, f"{key}.second", "bytes_list", what)
    if not len(first) == len(second) == len(ids):
        raise ProtocolError(f"{what}: {key!r} lists of different lengths")
    return {i: (a, b) for i, a, b in zip(ids, first, second)}


def to_fields(message) -> dict:
    """A protocol message as flat fields (its type under ``"type"``)."""
    schema = SCHEMAS[type(message)]
    out: dict = {"type": type(message).__name__}
    for key, kind in schema.items():
        _put(out, key, kind, getattr(message, key))
    return out


def from_fields(fields: dict, expected: type | None = None):
    """The protocol message the fields hold; a ProtocolError if they are not one (of ``expected``)."""
    if not isinstance(fields, dict):
        raise ProtocolError(f"a secure-aggregation message must be fields, not {type(fields).__name__}")
    name = fields.get("type")
    if name not in BY_NAME:
        raise ProtocolError(f"not a secure-aggregation message (type {name!r})")
    cls = BY_NAME[name]
    if expected is not None and cls is not expected:
        raise ProtocolError(f"a {name} where a {expected.__name__} was expected")
    return cls(**{key: _get(fields, key, kind, name) for key, kind in SCHEMAS[cls].items()})


# ---- a client's state between messages (kept by its own node, never sent) --------------------------
def client_state(client: SecAggClient) -> dict:
    """Every field a client needs for its next phase, including its stage (so a node that rebuilds it
    every phase still runs each phase once and in order) and whom it accused."""
    out: dict = {"id": client.id, "stage": client.stage}
    if client.vector is not None:  # an instance set up ahead of its exchange gets it with the masked input
        out["vector"] = np.asarray(client.vector, dtype="<u8").tobytes()
    if client.setup_msg is not None:
        out.update({f"setup.{k}": v for k, v in to_fields(client.setup_msg).items()})
        out["cipher_sk"] = P.private_bytes(client.cipher_sk)
        out["mask_sk"] = P.private_bytes(client.mask_sk)
        out["seed"] = client.seed
    if hasattr(client, "peer_keys"):
        _put(out, "peer_keys", "pair_map", client.peer_keys)
    _put(out, "shared_with", "ints", client.shared_with)
    _put(out, "held", "pair_map", client.held)
    _put(out, "accused", "ints", client.accused)
    return out


def client_from_state(fields: dict) -> SecAggClient:
    what = "secure-aggregation state"
    vector = _get(fields, "vector", "ring", what) if "vector" in fields else None
    client = SecAggClient(_get(fields, "id", "int", what), vector)
    client.stage = _get(fields, "stage", "int", what)
    if not (client.stage == ABORTED or 0 <= client.stage < len(STAGES)):
        raise ProtocolError(f"{what}: stage {client.stage} is not one of the client's stages")
    if client.stage != ABORTED and (client.stage > 0) != ("setup.type" in fields):
        raise ProtocolError(f"{what}: stage {client.stage} with{'out' if client.stage > 0 else ''} a setup")
    if "setup.type" in fields:
        client.setup_msg = from_fields(
            {k.removeprefix("setup."): v for k, v in fields.items() if k.startswith("setup.")}, Setup
        )
        secrets = {k: _get(fields, k, "bytes", what) for k in ("cipher_sk", "mask_sk", "seed")}
        if any(len(v) != 32 for v in secrets.values()):
            raise ProtocolError(f"{what}: keys and seed must be 32 bytes")
        client.cipher_sk = P.private_from_bytes(secrets["cipher_sk"])
        client.mask_sk = P.private_from_bytes(secrets["mask_sk"])
        client.seed = secrets["seed"]
    if "peer_keys.ids" in fields:
        client.peer_keys = _get(fields, "peer_keys", "pair_map", what)
    client.shared_with = _get(fields, "shared_with", "ints", what)
    client.held = _get(fields, "held", "pair_map", what)
    client.accused = _get(fields, "accused", "ints", what)
    return client
