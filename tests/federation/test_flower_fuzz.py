"""No reply can crash the Flower server (DESIGN §5, "Robustness"): replies mutated on their way back
(through the in-process grid's ``meddle``) — headers, record names, client lists, sizes, arrays,
scores, secure-aggregation entries — are rejected with a logged reason naming the node (or the
client, who is then dropped), and the exchange either completes, exactly as without the mutation for
the clients the mutation did not touch, or fails cleanly (a skipped secure instance, a refused
federation)."""

from __future__ import annotations

import itertools
import logging
import math
import os

import numpy as np
import pytest
import torch
from flower_grid import SMALL, InProcessGrid, snapshot
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from pfpl.config import load_config
from pfpl.errors import DeploymentError
from pfpl.federation.context import Benchmark
from pfpl.federation.flower import records as R
from pfpl.federation.flower.driver import Cluster, FlowerTraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: PFPL_FUZZ_EXAMPLES=500 explores further, with fresh random examples (default: 20, the same each run)
EXAMPLES = int(os.environ.get("PFPL_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 20,
    deadline=None,
    derandomize=not EXAMPLES,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its example as drawn
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: values of every type a ConfigRecord carries, none of them the right value of any field
WEIRD = st.one_of(
    st.integers(-3, 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=12),
    st.booleans(),
    st.lists(st.integers(-2, 9), max_size=3),
    st.lists(st.binary(max_size=4), min_size=1, max_size=2),
    st.lists(st.booleans(), min_size=1, max_size=2),
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=2),
    st.lists(st.text(max_size=2), min_size=1, max_size=2),
)
COMMON = ["header-set", "header-del", "header-add", "record-add", "record-del"]
ARRAYS = ["array-set", "array-del", "array-add"]
ENTRIES = ["entry-rename", "entry-set", "entry-del", "entry-copy"]


def _mutation(ops):
    return st.tuples(st.sampled_from(ops), st.integers(0, 99), st.integers(0, 99), WEIRD)


def _bad_array(j: int, like: np.ndarray, sizes: bool) -> Array:
    """A malformed or invalid array in place of ``like`` (never one a valid reply could hold)."""
    shape = tuple(like.shape)
    bad = [
        lambda: Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=b"garbage"),
        lambda: Array(dtype="float32", shape=shape, stype="torch.tensor", data=like.tobytes()),
        lambda: Array(like.astype(np.int64)),
        lambda: Array(np.full_like(like, np.nan)),
        lambda: Array(np.full_like(like, -np.inf)),
        lambda: Array(like.reshape(-1)[:-1].copy()),
        lambda: Array(like.astype(np.complex64)),
        lambda: Array(like.astype(bool)),
        lambda: Array(np.array(["a"] * max(1, like.size))),
    ]
    if sizes:
        bad.append(lambda: Array(like + 1.0))
    return bad[j % len(bad)]()


def _entry_names(content: RecordDict) -> list[str]:
    return sorted(k for k in content.config_records if k.startswith("secagg/"))


def mutate(op: str, i: int, j: int, value, content: RecordDict) -> dict:
    """Apply one mutation to a reply in place; what it did (``accused``: clients it names as accused)."""
    head = content.config_records.get(R.PFPL)
    keys = sorted(head) if head is not None else []
    if op == "header-set" and keys:
        head[keys[i % len(keys)]] = value
    elif op == "header-del" and keys:
        del head[keys[i % len(keys)]]
    elif op in ("header-add", "header-set", "header-del") and head is not None:
        head[f"extra{i}"] = value
    elif op == "record-add":
        kind = i % 3
        if kind == 0:
            content.config_records[f"x{j}"] = ConfigRecord({"a": value})
        elif kind == 1:
            content.array_records[f"x{j}"] = ArrayRecord({"a": Array(np.zeros(2, np.float32))})
        else:
            content.metric_records[f"x{j}"] = MetricRecord({"a": 1.0})
    elif op == "record-del":
        names = sorted(content.config_records) + sorted(content.array_records)
        name = names[i % len(names)]
        records = content.config_records if name in content.config_records else content.array_records
        del records[name]
    elif op in ARRAYS and len(content.array_records):
        name = sorted(content.array_records)[i % len(content.array_records)]
        record = content.array_records[name]
        key = sorted(record)[j % len(record)]
        if op == "array-set":
            record[key] = _bad_array(j, record[key].numpy(), sizes=name == R.STATS)
        elif op == "array-del":
            del record[key]
        else:
            record[f"x{j}"] = Array(np.zeros(record[key].numpy().shape, np.float32))
    elif op in ENTRIES and _entry_names(content):
        names = _entry_names(content)
        entry = names[i % len(names)]
        _, phase, inst, client = entry.split("/")
        fields = content.config_records[entry]
        if op == "entry-rename":
            bad = [
                f"secagg/{phase}/{inst}",
                f"secagg/{phase}/{inst}{client}",
                f"secagg/{phase}/9.9.9.9/{client}",
                f"secagg/{phase}/{inst}/abc",
                f"secagg/{phase}/{inst}/{int(client) + 100}",
                f"secagg/{phase}/{inst}/{client}/x",
                f"secagg/{phase}//{client}",
                f"secagg/{phase}/{inst}/-{client}",
                f"secagg/unmask/{inst}/{client}" if phase != "unmask" else f"secagg/share/{inst}/{client}",
            ][j % 9]
            content.config_records[bad] = content.config_records.pop(entry)
        elif op == "entry-copy":
            other = j % 5
            content.config_records[f"secagg/{phase}/{inst}/{other}"] = ConfigRecord(dict(fields))
        else:
            key = sorted(fields)[j % len(fields)]
            if op == "entry-del":
                del fields[key]
            else:
                fields[key] = value
                if key == "rejected" and isinstance(value, list) and all(type(v) is int for v in value):
                    return {"accused": set(value)}
    else:  # nothing of that kind in this reply: an extra header key instead
        content.config_records[f"x{j}"] = ConfigRecord({"a": value})
    return {}


def _same_snapshot(a: dict, b: dict) -> bool:
    def canon(s):
        arrays = {k: {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in v.items()} for k, v in s["array"].items()}
        return repr(sorted((k, sorted(v.items())) for k, v in s["config"].items())), arrays, repr(s["metric"])

    return canon(a) == canon(b)


class Meddler:
    """Mutates the first reply of ``kind`` (and, for secure aggregation, ``phase``) from ``node``."""

    def __init__(self, kind: str, node: int, mutation: tuple, phase: str | None = None):
        self.kind, self.node, self.mutation, self.phase = kind, node, mutation, phase
        self.done, self.changed, self.effect = False, False, {}

    def __call__(self, kind, node, content) -> None:
        if self.done or kind != self.kind or node != self.node:
            return
        if self.phase is not None and not any(R.secagg_entry(k)[0] == self.phase for k in _entry_names(content)):
            return
        self.done = True
        before = snapshot(content)
        self.effect = mutate(*self.mutation, content)
        self.changed = not _same_snapshot(before, snapshot(content))


class World(dict):
    def __repr__(self) -> str:  # a failing example prints its arguments: keep this one short
        return "<the fuzz world>"


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def world(flower_cache):
    """One small private (seeded) federation in the clear and one under secure aggregation, their
    SuperNodes connected once, and the un-meddled answers of one exchange and one evaluation."""
    base = [*SMALL, f"cache_dir='{flower_cache}'", "train.methods=['promptfl']", "federation.rounds=1"]
    private = load_config(None, [*base, "dp.mode='feature'", "dp.noise_multiplier=1.0", "dp.randomness='seeded'"])
    secure = load_config(None, [*base, "federation.secure_aggregation=true"])
    out = World()
    for name, cfg in (("plain", private), ("secure", secure)):
        bench = Benchmark(cfg)
        grid = InProcessGrid(3, flower_cache, record=name == "secure")
        cluster = Cluster(grid, cfg, 3)
        cluster.connect(bench)
        out[name] = (cfg, bench, grid, cluster)
    cfg, bench, grid, cluster = out["plain"]
    everyone = list(range(cfg.federation.n_clients))
    out["upload"] = FlowerTraining(cluster, bench, "promptfl").rounds.step(everyone, 0, 0, 1, last=False)
    out["evaluation"] = FlowerTraining(cluster, bench, "promptfl").evaluate()
    handler = Warnings()
    logging.getLogger("pfpl").addHandler(handler)
    out["warnings"] = handler
    yield out
    logging.getLogger("pfpl").removeHandler(handler)


@FUZZ
@given(
    kind=st.sampled_from(["train", "evaluate", "query"]),
    node=st.sampled_from([100, 101, 102]),
    mutation=_mutation(COMMON + ARRAYS),
)
def test_a_mutated_reply_is_rejected_and_the_others_count_exactly(world, kind, node, mutation):
    cfg, bench, grid, cluster = world["plain"]
    meddler = Meddler(kind, node, mutation)
    grid.meddle = meddler
    rejected = len(cluster.rejected)
    try:
        if kind == "query":  # a federation whose node says hello wrongly does not start
            fresh = Cluster(grid, cfg, 3)
            with pytest.raises(DeploymentError):
                fresh.connect(bench)
            assume(meddler.changed)
            return
        training = FlowerTraining(cluster, bench, "promptfl")
        everyone = list(range(cfg.federation.n_clients))
        result = training.rounds.step(everyone, 0, 0, 1, last=False) if kind == "train" else training.evaluate()
    finally:
        grid.meddle = None
    assume(meddler.changed)
    new = cluster.rejected[rejected:]
    assert [r["node"] for r in new] == [node] and new[0]["kind"] == kind, new
    gone = set(cluster.hosted[node])
    if kind == "train":
        base = world["upload"]
        kept = [c for c in everyone if c not in gone]
        assert result.clients.tolist() == kept
        rows = [base.clients.tolist().index(c) for c in kept]
        for name, value in result.values.items():
            assert torch.equal(value, base.values[name][rows])  # untouched clients: exactly as before
    else:
        base = world["evaluation"]["per_client"]["local"]
        got = result["per_client"]["local"]
        assert all(got[c] is None for c in gone)
        assert all(got[c] == base[c] for c in everyone if c not in gone)


def _pending_rows(grid) -> dict[int, torch.Tensor]:
    rows = {}
    for context in grid.contexts.values():
        meta = context.state.config_records["promptfl/pending-meta"]
        values = R.from_arrays(context.state.array_records["promptfl/pending-values"])["global"]
        rows.update({int(c): values[i].double().flatten() for i, c in enumerate(meta["clients"])})
    return rows


def _accusations(replies) -> set[int]:
    """Every client named in, or making, an accusation in the masked inputs the server received."""
    out = set()
    for kind, _, snap in replies:
        if kind != "train":  # masked inputs ride on the train replies
            continue
        for entry, fields in snap["config"].items():
            rejected = fields.get("rejected") if entry.startswith("secagg/") else None
            if isinstance(rejected, list) and rejected:
                out |= {fields.get("sender"), *rejected}
    return out


@FUZZ
@given(
    phase=st.sampled_from(["advertise", "share", "masked", "unmask"]),
    node=st.sampled_from([100, 101, 102]),
    mutation=_mutation(COMMON + ENTRIES),
)
def test_a_mutated_secure_aggregation_answer_drops_its_client_and_the_sum_stays_exact(world, phase, node, mutation):
    """The instance either releases the exact size-weighted mean of its survivors — every client of an
    untouched node among them, unless named in an accusation — or is skipped and recorded."""
    cfg, bench, grid, cluster = world["secure"]
    warnings = world["warnings"]
    warnings.messages.clear()
    training = FlowerTraining(cluster, bench, "promptfl")
    seen = {}
    apply = training.server.apply  # what the secure session released, as the server applies it
    training.server.apply = lambda name, agg, touched, r: (
        seen.setdefault("out", ({name: agg}, {name: touched})),
        apply(name, agg, touched, r),
    )[1]
    meddler = Meddler("train" if phase == "masked" else "train.secagg", node, mutation, phase)
    grid.meddle, grid.replies[:] = meddler, []
    rejected, failures = len(cluster.rejected), len(training.server.aggregator.failures)
    everyone = list(range(cfg.federation.n_clients))
    try:
        training.rounds.step(everyone, 0, 0, 1, last=False)
    finally:
        grid.meddle = None
    assume(meddler.changed)
    assert any(r["node"] == node for r in cluster.rejected[rejected:]) or any(
        "rejected client" in m or "ignored" in m or "did not answer" in m for m in warnings.messages
    ), warnings.messages
    sums, released = seen["out"]
    if not bool(released["global"][0]):
        event("the instance failed and was skipped")
        assert len(training.server.aggregator.failures) == failures + 1
        return
    event("the instance completed")
    rows, sizes = _pending_rows(grid), bench.partition.sizes()
    must = {c for c in everyone if c not in cluster.hosted[node]} - _accusations(grid.replies)
    must -= meddler.effect.get("accused", set())
    total = sums["global"][0].double().flatten()
    threshold = training.server.aggregator.settings.threshold_for(len(everyone))
    matches = [
        s
        for k in range(threshold, len(everyone) + 1)
        for s in itertools.combinations(everyone, k)
        if must <= set(s)
        and torch.allclose(total, sum(sizes[c] * rows[c] for c in s) / sum(sizes[c] for c in s), atol=1e-5)
    ]
    assert matches, "the released sum is no survivors' mean"
    assert all(math.isfinite(float(x)) for x in total)


def _set_header(key, value):
    return lambda content: content.config_records[R.PFPL].__setitem__(key, value)


def _rename_first(new):
    def how(content):
        entry = _entry_names(content)[0]
        content.config_records[new(entry)] = content.config_records.pop(entry)

    return how


def _copy_first(new):
    def how(content):
        entry = _entry_names(content)[0]
        content.config_records[new(entry)] = ConfigRecord(dict(content.config_records[entry]))

    return how


GARBAGE = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
#: replies that used to crash the ServerApp (each as: the reply kind it alters, how)
CRASHERS = {
    "version-abc": ("train", _set_header("version", "abc")),
    "version-nan": ("train", _set_header("version", math.nan)),
    "version-list": ("train", _set_header("version", [1])),
    "version-bytes": ("train", _set_header("version", b"1")),
    "malformed-array": ("train", lambda content: content.array_records[R.VALUES].__setitem__("global", GARBAGE)),
    "entry-without-its-client": ("train.secagg", _rename_first(lambda e: e.rsplit("/", 1)[0])),
    "answer-for-an-unexpected-instance": ("train.secagg", _copy_first(lambda e: f"secagg/7.3/{e.rsplit('/', 1)[1]}")),
}


@pytest.mark.parametrize("case", sorted(CRASHERS))
def test_a_reply_that_used_to_crash_the_server_is_rejected_naming_its_node(world, case):
    kind, how = CRASHERS[case]
    cfg, bench, grid, cluster = world["secure" if kind == "train.secagg" else "plain"]
    done = []

    def meddle(k, node, content):
        if k == kind and node == 101 and not done:
            done.append(True)
            how(content)

    grid.meddle, before = meddle, len(cluster.rejected)
    training = FlowerTraining(cluster, bench, "promptfl")
    try:
        upload = training.rounds.step(list(range(cfg.federation.n_clients)), 0, 0, 1, last=False)
    finally:
        grid.meddle = None
    new = cluster.rejected[before:]
    assert done and new and all(r["node"] == 101 for r in new), new
    if kind == "train":  # the node's clients are left out, the others aggregated
        assert upload.clients.tolist() == [c for c in range(cfg.federation.n_clients) if c not in cluster.hosted[101]]
    else:  # a client dropped at most: the instance still completes
        assert not training.server.aggregator.failures
