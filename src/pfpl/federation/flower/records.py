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
from pfpl.messages import PHASES

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


def secagg_key(phase: str, exchange: tuple[int, int], instance: str, client: int) -> str:
    """The entry of one client's message of one secure instance: ``secagg/{phase}/{round}.{step}.
    {parameter}.{group}/{client}`` — named by its exchange, so the key rounds of the next exchange's
    instances can ride on this exchange's round trips."""
    return f"secagg/{phase}/{exchange[0]}.{exchange[1]}.{instance}/{client}"


def secagg_entry(key: str) -> tuple[str, tuple[int, int], str, int]:
    """A :func:`secagg_key` as (phase, (round, step), ``"{parameter}.{group}"``, client)."""
    parts = key.split("/")
    if (
        len(parts) != 4
        or parts[0] != "secagg"
        or parts[1] not in PHASES
        or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,6}\.[0-9]{1,6}", parts[2])
    ):
        raise ProtocolError(
            f"{key!r} is not a secure-aggregation entry (secagg/<phase>/<round>.<step>.<parameter>.<group>/<client>)"
        )
    if not re.fullmatch(r"[0-9]{1,9}", parts[3]):
        raise ProtocolError(f"{key!r} names no client id")
    r, step, index, group = (int(x) for x in parts[2].split("."))
    out = parts[1], (r, step), f"{index}.{group}", int(parts[3])
    if secagg_key(*out) != key:  # "2" and "02" would name one client's state twice
        raise ProtocolError(f"{key!r} is not written canonically (no leading zeros)")
    return out


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


# ---- a server phase's per-client requests and replies ------------------------------------------------
FLAT_TYPES = (int, float, str, bytes, bool)
ARRAYS = "/arrays"  # the ArrayRecord beside a client's ConfigRecord of fields


def put_fields(content: RecordDict, name: str, fields: dict) -> None:
    """One client's flat fields as records named ``name``: numpy arrays in an ArrayRecord, the rest
    (ints, floats, strings, bytes, bools and lists of one of those) in a ConfigRecord."""
    arrays, config = {}, {}
    for key, value in fields.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, FLAT_TYPES) or (isinstance(value, list) and _flat_list(value)):
            config[key] = value
        else:
            raise TypeError(f"field {key!r} of {name!r}: {type(value).__name__} is not a flat value")
    content.config_records[name] = ConfigRecord(config)
    if arrays:  # a RecordDict's names are unique across record types
        content.array_records[name + ARRAYS] = ArrayRecord(array_dict=arrays)


def _flat_list(value: list) -> bool:
    kinds = {type(v) for v in value}
    return len(kinds) <= 1 and kinds <= set(FLAT_TYPES)


def take_fields(content: RecordDict, prefix: str) -> dict[int, dict]:
    """The per-client fields of records ``{prefix}/{client}`` (see :func:`put_fields`): arrays as numpy
    (numeric only), config values as they are; a malformed name or value is a ProtocolError."""
    out: dict[int, dict] = {}
    arrays = {name.removesuffix(ARRAYS) for name in content.array_records if name.endswith(ARRAYS)}
    for name in set(content.config_records) | arrays:
        if not name.startswith(prefix + "/"):
            continue
        client = name[len(prefix) + 1 :]
        if not re.fullmatch(r"[0-9]{1,9}", client):
            raise ProtocolError(f"record {name!r} names no client id")
        if name not in content.config_records:
            raise ProtocolError(f"record {name!r} has arrays but no fields")
        fields = dict(content.config_records[name])
        if name in arrays:
            for key, tensor in from_arrays(content.array_records[name + ARRAYS]).items():
                if key in fields:
                    raise ProtocolError(f"record {name!r} holds {key!r} twice")
                fields[key] = tensor.numpy()
        out[int(client)] = fields
    return out


def only_records(reply: RecordDict, configs: set[str], arrays: frozenset[str] = frozenset(), prefix: str = "") -> None:
    """The reply holds exactly these config and array records (and, if ``prefix``, any config record
    whose name starts with it); no metric record. Else a ProtocolError naming the stray ones."""
    names = {k for k in reply.config_records if not (prefix and k.startswith(prefix))}
    if names != configs or set(reply.array_records) != set(arrays) or len(reply.metric_records):
        have = sorted(reply.config_records) + sorted(reply.array_records) + sorted(reply.metric_records)
        raise ProtocolError(f"the reply holds records {have}, expected {sorted(configs | set(arrays))}")


def content(header: dict, shared: dict[str, torch.Tensor] | None = None) -> RecordDict:
    """A message's content: the pfpl header and, if any, the shared values it carries."""
    out = RecordDict()
    out.config_records[PFPL] = ConfigRecord({"version": PROTOCOL_VERSION, **header})
    if shared:
        out.array_records[SHARED] = to_arrays(shared)
    return out
