"""What pfpl sends over Flower, as Flower records: tensors as ``ArrayRecord`` entries, everything
else as ``ConfigRecord`` values. Nothing is pickled: a record from another party is decoded field by
field and checked, so a malformed one is rejected with a reason instead of executed."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pfpl.errors import ProtocolError

PFPL = "pfpl"  # the ConfigRecord with the message's header
VALUES = "values"  # ArrayRecord: one tensor per shared parameter, rows in the header's client order
STATS = "stats"  # ArrayRecord: sizes and loss per client
SHARED = "shared"  # ArrayRecord: the shared parameters each addressed client received
PROTOCOL_VERSION = 1


def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()}
    )


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def header(content: RecordDict) -> ConfigRecord:
    """The message's pfpl header, or a :class:`~pfpl.errors.ProtocolError` naming what is wrong."""
    if PFPL not in content.config_records:
        raise ProtocolError("the message has no 'pfpl' header")
    head = content.config_records[PFPL]
    if int(head.get("version", -1)) != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head.get('version')!r}, expected {PROTOCOL_VERSION}")
    return head


def int_list(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if value is None:
        raise ProtocolError(f"the header has no {key!r}")
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ProtocolError(f"{key!r} must be a list of integers")
    return [int(v) for v in items]


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
