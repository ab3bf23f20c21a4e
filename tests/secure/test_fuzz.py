"""A fuzzer between the clients and the server: replies are dropped, duplicated, relabelled, flipped,
retyped, truncated, given unknown ids or replayed from another instance. Whatever arrives, nothing
but a :class:`SecureAggregationError` escapes, and a completed run returns exactly the sum of the
survivors it reports — never an honest non-survivor's vector, never a silently wrong sum."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfpl.secure.graph import neighbours
from pfpl.secure.protocol import PHASES, SecureAggregationError, run_in_memory

GRAPHS = {"full": (6, None, 4), "sparse": (7, 4, 4)}  # n, degree, threshold
KINDS = ("drop", "duplicate", "swap", "flip", "wrongtype", "truncate", "unknown_id", "replay")
WRONG = (None, "x", 1.5, True, {}, [], b"x", {"a": 1}, (b"k",), np.zeros(3))
UNKNOWN = 99


@functools.cache
def _setting(name: str):
    n, degree, t = GRAPHS[name]
    rng = np.random.default_rng(7)
    vectors = {c: rng.integers(0, 2**64, 5, dtype=np.uint64) for c in range(n)}
    graph = neighbours(list(range(n)), degree, 3)
    bank: dict[str, dict[int, object]] = {p: {} for p in PHASES}

    def record(phase, msgs):
        bank[phase].update({m.sender: m for m in msgs})
        return msgs

    run_in_memory(vectors, t, graph, meddle=record)  # another instance: its messages are for replaying
    return vectors, graph, t, bank


def _payload_fields(m) -> list[str]:
    return [f.name for f in dataclasses.fields(m) if f.name not in ("round_id", "sender")]


def _flip(value, position: int):
    if isinstance(value, bytes) and value:
        b = bytearray(value)
        b[position % len(b)] ^= 1 << (position % 8)
        return bytes(b)
    if isinstance(value, dict) and value:
        key = sorted(value)[position % len(value)]
        return {**value, key: _flip(value[key], position // 7)}
    if isinstance(value, tuple) and value and all(isinstance(v, bytes) for v in value):
        i = position % len(value)
        return value[:i] + (_flip(value[i], position // 3),) + value[i + 1 :]
    if isinstance(value, tuple):  # an accusation list: name another client
        return (*value, position % 8)
    return value  # a masked vector: flipping it is a different input, not a protocol fault


def _truncate(value, position: int):
    if isinstance(value, (bytes, np.ndarray)) and len(value):
        return value[: position % len(value)]
    if isinstance(value, dict) and value:
        key = sorted(value)[position % len(value)]
        return {k: (_truncate(v, position) if k == key else v) for k, v in value.items()}
    if isinstance(value, tuple):
        return value[:-1]
    return value


def _unknown(value):
    if isinstance(value, dict):
        some = next(iter(value.values()), b"\x00" * 66)
        return {**value, UNKNOWN: some}
    if isinstance(value, tuple):
        return (*value, UNKNOWN)
    return value


def _mutate(kind: str, msgs: list, index: int, position: int, bank: dict, phase: str) -> list:
    if not msgs:
        return msgs
    i = index % len(msgs)
    m = msgs[i]
    out = list(msgs)
    if kind == "drop":
        del out[i]
    elif kind == "duplicate":
        out.insert(position % (len(out) + 1), m)
    elif kind == "swap":
        j = (i + 1 + position % max(1, len(msgs) - 1)) % len(msgs)
        if j != i:
            out[i], out[j] = (
                dataclasses.replace(m, sender=msgs[j].sender),
                dataclasses.replace(msgs[j], sender=m.sender),
            )
    elif kind == "replay":
        if m.sender in bank[phase]:
            out[i] = bank[phase][m.sender]
    elif kind == "unknown_id" and position % 3 == 0:
        out[i] = dataclasses.replace(m, sender=UNKNOWN)
    else:
        names = _payload_fields(m) + (["round_id"] if kind == "wrongtype" else [])
        name = names[position % len(names)]
        value = getattr(m, name)
        change = {
            "flip": lambda v: _flip(v, position),
            "truncate": lambda v: _truncate(v, position),
            "unknown_id": _unknown,
            "wrongtype": lambda v: WRONG[position % len(WRONG)],
        }[kind]
        out[i] = dataclasses.replace(m, **{name: change(value)})
    return out


mutation = st.tuples(st.sampled_from(PHASES), st.sampled_from(KINDS), st.integers(0, 50), st.integers(0, 10_000))


def _check(name: str, mutations: list, drops: dict) -> None:
    vectors, graph, t, bank = _setting(name)
    if any(p == "masked" and k == "swap" for p, k, _, _ in mutations):
        # a relabelled masked input is indistinguishable from the clients having swapped inputs (the
        # transport authenticates senders); alone its sum is still exact, with an accusation it is not
        mutations = [m for m in mutations if m[0] == "masked" and m[1] == "swap"][:1]

    def meddle(phase, msgs):
        for p, kind, index, position in mutations:
            if p == phase:
                msgs = _mutate(kind, msgs, index, position, bank, phase)
        return msgs

    try:
        got = run_in_memory(vectors, t, graph, drops=drops, meddle=meddle)
    except SecureAggregationError as err:
        assert "\n" not in str(err)
        return
    expected = np.zeros(5, dtype=np.uint64)
    for c in got.survivors:
        expected = expected + vectors[c]
    assert np.array_equal(got.total, expected), (mutations, drops, got.survivors, got.rejected)
    delivered = {c for c in vectors if c not in drops or drops[c] == "unmask"}
    assert set(got.survivors) <= delivered  # a client that sent no masked input is never summed


def _drops(n: int):
    return st.dictionaries(st.integers(0, n - 1), st.sampled_from(PHASES), max_size=2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=3), _drops(GRAPHS["full"][0]))
def test_fuzzed_replies_on_the_full_graph(mutations, drops):
    _check("full", mutations, drops)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=3), _drops(GRAPHS["sparse"][0]))
def test_fuzzed_replies_on_a_sparse_graph(mutations, drops):
    _check("sparse", mutations, drops)
