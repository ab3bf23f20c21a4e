"""What pfpl sends over Flower, as Flower records: tensors as ``ArrayRecord`` entries, everything
else as ``ConfigRecord`` values. Nothing is pickled: a record from another party is decoded field by
field and checked — every helper here raises :class:`~pfpl.errors.ProtocolError`, and nothing else,
on a malformed value — so a bad reply is rejected with a reason instead of executed or crashing the
server."""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pfpl.errors import ProtocolError

PFPL = "pfpl"  # the ConfigRecord with the message's header
VALUES = "values"  # ArrayRecord: one tensor per shared parameter, rows in the header's client order
STATS = "stats"  # ArrayRecord: sizes per client (and the training loss, in non-private runs only)
SHARED = "shared"  # ArrayRecord: the shared parameters each addressed client received
PROTOCOL_VERSION = 1


def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()}
    )


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays as CPU tensors: plain numeric numpy arrays only (a malformed ``Array`` — not
    numpy, unreadable bytes, a structured or object dtype — is a ProtocolError naming its key)."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"expected an ArrayRecord, got {type(record).__name__}")
    out = {}
    for key, value in record.items():
        try:
            array = value.numpy()
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
                raise TypeError(f"not a numeric array ({getattr(array, 'dtype', type(array).__name__)})")
            array = array.astype(array.dtype.newbyteorder("="), copy=True)
            out[key] = torch.from_numpy(array)
        except Exception as err:  # anything numpy or flwr raises on bytes another party made
            raise ProtocolError(f"array {key!r} is malformed: {type(err).__name__}: {err}") from None
    return out


def header(content: RecordDict, keys: set[str] | None = None) -> ConfigRecord:
    """The message's pfpl header, or a :class:`~pfpl.errors.ProtocolError` naming what is wrong.
    ``keys``: the header must hold exactly these (besides ``version``)."""
    if PFPL not in content.config_records:
        raise ProtocolError("the message has no 'pfpl' header")
    head = content.config_records[PFPL]
    version = head.get("version")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if keys is not None and set(head) != {"version", *keys}:
        extra, missing = sorted(set(head) - {"version", *keys}), sorted(set(keys) - set(head))
        raise ProtocolError(f"the header has unexpected keys {extra} or lacks {missing}")
    return head


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_list(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if value is None:
        raise ProtocolError(f"the header has no {key!r}")
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ProtocolError(f"{key!r} must be a list of integers")
    return [int(v) for v in value]


def integer(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not _is_int(value):
        raise ProtocolError(f"{key!r} must be an integer, not {value!r}")
    return int(value)


def text(record: ConfigRecord, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string, not {type(value).__name__}")
    return value


def float_list(record: ConfigRecord, key: str, n: int) -> list[float]:
    """``n`` numbers (integers or floats, NaN and ±inf allowed: the caller checks their range)."""
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"{key!r} must be a list of numbers")
    if len(value) != n:
        raise ProtocolError(f"{key!r} has {len(value)} values for {n} clients")
    return [float(v) for v in value]


def secagg_entry(key: str) -> tuple[str, int]:
    """``secagg/{instance}/{client}`` as (instance, client); the instance is ``{parameter}.{group}``."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "secagg" or not re.fullmatch(r"[0-9]{1,6}\.[0-9]{1,6}", parts[1]):
        raise ProtocolError(f"{key!r} is not a secure-aggregation entry (secagg/<parameter>.<group>/<client>)")
    if not re.fullmatch(r"[0-9]{1,9}", parts[2]):
        raise ProtocolError(f"{key!r} names no client id")
    return parts[1], int(parts[2])


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str
) -> dict[str, torch.Tensor]:
    """Exactly the expected names, shapes and finite floating-point values; else a ProtocolError."""
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ProtocolError(
            f"{what}: keys {sorted(tensors)}, expected {sorted(expected)} (extra {extra}, missing {missing})"
        )
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise ProtocolError(f"{what}: {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not value.is_floating_point():
            raise ProtocolError(f"{what}: {name!r} is {value.dtype}, not floating point")
        if not bool(torch.isfinite(value).all()):
            raise ProtocolError(f"{what}: {name!r} holds NaN or infinite values")
    return tensors


def finite_or_none(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else float(x)
