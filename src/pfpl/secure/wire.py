"""The secure-aggregation messages and a client's protocol state as flat fields — integers, bytes and
lists of them — for a transport that carries such values (Flower's ConfigRecord) between processes.
Decoding checks every field's type and never unpickles, so a malformed message from another party
is a :class:`~pfpl.errors.ProtocolError`, not code."""

from __future__ import annotations

import numpy as np

from pfpl.errors import ProtocolError
from pfpl.secure import primitives as P
from pfpl.secure.protocol import (
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
    AdvertiseKeys: {"round_id": "bytes", "sender": "int", "cipher_key": "bytes", "mask_key": "bytes"},
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
    name = fields.get("type")
    if name not in BY_NAME:
        raise ProtocolError(f"not a secure-aggregation message (type {name!r})")
    cls = BY_NAME[name]
    if expected is not None and cls is not expected:
        raise ProtocolError(f"a {name} where a {expected.__name__} was expected")
    return cls(**{key: _get(fields, key, kind, name) for key, kind in SCHEMAS[cls].items()})


# ---- a client's state between messages (kept by its own node, never sent) --------------------------
def client_state(client: SecAggClient) -> dict:
    out: dict = {"id": client.id, "vector": np.asarray(client.vector, dtype="<u8").tobytes()}
    if client.setup_msg is not None:
        out.update({f"setup.{k}": v for k, v in to_fields(client.setup_msg).items()})
        out["cipher_sk"] = P.private_bytes(client.cipher_sk)
        out["mask_sk"] = P.private_bytes(client.mask_sk)
        out["seed"] = client.seed
    if hasattr(client, "peer_keys"):
        _put(out, "peer_keys", "pair_map", client.peer_keys)
    _put(out, "shared_with", "ints", client.shared_with)
    _put(out, "held", "pair_map", client.held)
    return out


def client_from_state(fields: dict) -> SecAggClient:
    what = "secure-aggregation state"
    client = SecAggClient(_get(fields, "id", "int", what), _get(fields, "vector", "ring", what))
    if "setup.type" in fields:
        client.setup_msg = from_fields(
            {k.removeprefix("setup."): v for k, v in fields.items() if k.startswith("setup.")}
        )
        client.cipher_sk = P.private_from_bytes(_get(fields, "cipher_sk", "bytes", what))
        client.mask_sk = P.private_from_bytes(_get(fields, "mask_sk", "bytes", what))
        client.seed = _get(fields, "seed", "bytes", what)
    if "peer_keys.ids" in fields:
        client.peer_keys = _get(fields, "peer_keys", "pair_map", what)
    client.shared_with = _get(fields, "shared_with", "ints", what)
    client.held = _get(fields, "held", "pair_map", what)
    return client
