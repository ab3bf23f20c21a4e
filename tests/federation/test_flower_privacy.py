"""Who learns what on the Flower transport (DESIGN §5): what a node's replies carry in a private run,
whether the server can regenerate the clients' noise from everything it holds, whether a restarted
node continues its secret stream, and the deviations a server can try with the uploads waiting for
secure aggregation. The simulator's side of the same claims is tests/privacy/test_who_learns_what.py."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_grid import SMALL, InProcessGrid, same
from flwr.app import RecordDict

from pfpl.config import build_config, load_config
from pfpl.federation.context import Benchmark
from pfpl.federation.flower import records as R
from pfpl.federation.flower.driver import Cluster, FlowerTraining, _content
from pfpl.federation.flower.node import MethodState
from pfpl.federation.runner import resume, run
from pfpl.secure import wire
from pfpl.secure.protocol import AdvertiseKeys, EncryptedShares, MaskedInput, UnmaskShares
from pfpl.streams import SERVER, Purpose, Streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRIVATE = ["dp.mode='feature'", "dp.noise_multiplier=5.0", "dp.sampling='poisson'", "train.methods=['dpfpl']"]
SECURE = [
    "train.methods=['dpfpl']",
    "federation.rounds=1",
    "federation.secure_aggregation=true",
    "dp.mode='per-sample'",
    "dp.noise_multiplier=1.0",
]
PHASE_MESSAGE = {"advertise": AdvertiseKeys, "share": EncryptedShares, "masked": MaskedInput, "unmask": UnmaskShares}


class Entropy:
    """Stands in for the OS entropy of every secret (pfpl.streams.entropy): distinct, unguessable from
    the config, recorded, and repeatable after ``reset`` (so a resumed run can be compared exactly)."""

    def __init__(self):
        self.count, self.drawn = 0, []

    def reset(self) -> None:
        self.count = 0

    def __call__(self, n: int) -> bytes:
        out = hashlib.sha256(b"pfpl-test-secret/%d" % self.count).digest()[:n]
        self.count += 1
        self.drawn.append(out)
        return out


@dataclass
class FlowerRun:
    cfg: object
    folder: Path
    summary: dict
    grid: InProcessGrid
    trainings: list
    checkpoints: list[bytes]  # the server's checkpoint after each round, as the server wrote it

    def uploads(self) -> list[tuple[int, dict]]:
        """Every plaintext upload the server received, in order: (node, {shared parameter: [b, ...]})."""
        return [(node, snap["array"]["values"]) for kind, node, snap in self.grid.replies if kind == "train"]


def _cluster(cfg, grid):
    cluster = Cluster(grid, cfg, 3)
    trainings: list[FlowerTraining] = []

    def training(bench, name):
        if not cluster.hosted:
            cluster.connect(bench)
        trainings.append(FlowerTraining(cluster, bench, name))
        return trainings[-1]

    return training, trainings


def _flower_run(tmp: Path, name: str, cfg, crash_after: int | None = None) -> FlowerRun:
    grid = InProcessGrid(3, cfg.cache_dir, record=True)
    training, trainings = _cluster(cfg, grid)
    checkpoints: list[bytes] = []

    def progress(method, done, total):
        checkpoints.append((tmp / name / "checkpoint.pt").read_bytes())
        if done == crash_after:
            raise KeyboardInterrupt

    try:
        summary = run(cfg, tmp / name, progress=progress, training=training)
    except KeyboardInterrupt:
        summary = None
    return FlowerRun(cfg, tmp / name, summary, grid, trainings, checkpoints)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, flower_cache):
    """A private Flower run with secret randomness, its seeded twin (the experiment setting), the
    server's replay of the secret run from the config it holds, and a private secure run."""
    import pfpl.streams

    tmp = tmp_path_factory.mktemp("flower-who")
    entropy = Entropy()
    mp = pytest.MonkeyPatch()
    mp.setattr(pfpl.streams, "entropy", entropy)
    cfg = load_config(None, [*SMALL, f"cache_dir='{flower_cache}'", *PRIVATE])
    out = {"secret": _flower_run(tmp, "secret", cfg)}
    seeded = load_config(None, [*SMALL, f"cache_dir='{flower_cache}'", *PRIVATE, "dp.randomness='seeded'"])
    out["seeded"] = _flower_run(tmp, "seeded", seeded)
    # the server's best guess: the streams the config it holds (config.json, the job) gives
    held = json.loads((out["secret"].folder / "config.json").read_text())
    assert held["dp"]["randomness"] == "secret"
    held["dp"]["randomness"] = "seeded"
    out["replay"] = _flower_run(tmp, "replay", build_config(held))
    secure = load_config(None, [*SMALL, f"cache_dir='{flower_cache}'", *SECURE])
    out["secure"] = _flower_run(tmp, "secure", secure)
    out["entropy"], out["tmp"] = entropy, tmp
    yield out
    mp.undo()


def _score_keys(cfg) -> set[str]:
    from pfpl.evaluation.federated import client_scores

    bench = Benchmark(cfg)
    return {f"score/{k}" for k in client_scores(torch.zeros(0, 1, 1), [], bench.test, bench.plan)}


@pytest.mark.parametrize("which", ["secret", "secure"])
def test_a_private_flower_node_sends_only_mechanism_outputs(runs, which):
    """Every key and value of every reply of a private run (feature DP in the clear; per-sample DP
    under secure aggregation with distributed DP): the shared values (noised) or the protocol's
    messages (masked), public metadata (version, client ids, record counts, fingerprints), and the
    evaluation's scores and ε — no loss, no norm, no other value."""
    r = runs[which]
    sizes = Benchmark(r.cfg).partition.sizes()
    scores = _score_keys(r.cfg)
    secure = r.cfg.federation.secure_aggregation
    kinds = set()
    for kind, _, snap in r.grid.replies:
        kinds.add(kind)
        assert not snap["metric"], kind
        head = snap["config"]["pfpl"]
        assert head["version"] == R.PROTOCOL_VERSION
        keys = set(head) - {"version"}
        names = [*snap["config"], *snap["array"], *keys, *(k for a in snap["array"].values() for k in a)]
        assert not any("loss" in n or "norm" in n for n in names), (kind, names)
        clients = head.get("clients")
        if kind == "query":
            assert keys == {"partition_id", "clients", "sizes", "backbone", "dataset"}
            assert head["sizes"] == [sizes[c] for c in clients] and set(snap["config"]) == {"pfpl"}
            assert not snap["array"]
        elif kind == "train":
            assert keys == {"clients"}
            if secure:  # the values stay on the node until the protocol masks them (they ride on train)
                assert not snap["array"]
                _only_protocol_messages(snap)
                continue
            assert set(snap["config"]) == {"pfpl"}
            assert set(snap["array"]) == {R.VALUES, R.STATS}
            assert set(snap["array"][R.STATS]) == {"sizes"}  # public record counts, no loss
            assert snap["array"][R.STATS]["sizes"].tolist() == [float(sizes[c]) for c in clients]
            values = snap["array"][R.VALUES]
            assert set(values) == {"global"} and values["global"].shape[0] == len(clients)
        elif kind == "train.secagg":
            assert not keys and not snap["array"]
            _only_protocol_messages(snap)
        elif kind == "evaluate":
            assert keys == {"clients", "epsilon", *scores} and set(snap["config"]) == {"pfpl"}
            assert not snap["array"]
            assert all(math.isfinite(e) and e > 0 for e in head["epsilon"])
            assert all(math.isnan(v) or 0 <= v <= 1 for k in scores for v in head[k])
        else:
            raise AssertionError(f"an unexpected reply {kind}")
    assert kinds == {"query", "train", "evaluate"} | ({"train.secagg"} if secure else set())


def _only_protocol_messages(snap: dict) -> None:
    """Every entry beside the header is exactly one protocol message of its phase, sent by its client."""
    for entry, fields in snap["config"].items():
        if entry == "pfpl":
            continue
        phase, _, _, client = R.secagg_entry(entry)
        message = wire.from_fields(fields, PHASE_MESSAGE[phase])
        assert message.sender == client
        assert wire.to_fields(message) == fields  # exactly the protocol's message, nothing beside


def _residuals(a: dict, b: dict) -> list[float]:
    """Each client's relative residual ‖a − b‖ / ‖b‖ of every uploaded tensor."""
    return [
        float(np.linalg.norm(a[k][i] - b[k][i]) / max(np.linalg.norm(b[k][i]), 1e-12))
        for k in b
        for i in range(len(b[k]))
    ]


def test_the_server_cannot_regenerate_the_noise_from_what_it_holds_on_flower(runs):
    """The server replays the secret run from the config it holds (it may know every record) with the
    seed's streams: against the seeded run it reproduces every client's upload exactly (the attack
    works, so the test can fail); against the secret run every client's residual is at the noise's
    scale (two independent draws: ≈ √2)."""
    replay, seeded, secret = runs["replay"].uploads(), runs["seeded"].uploads(), runs["secret"].uploads()
    assert len(replay) == len(seeded) == len(secret) == 3 * 2 * 2  # nodes × rounds × steps
    for (n1, ours), (n2, theirs) in zip(seeded, replay):
        assert n1 == n2 and max(_residuals(ours, theirs)) == 0.0
    for (n1, ours), (n2, theirs) in zip(secret, replay):
        assert n1 == n2 and min(_residuals(ours, theirs)) > 0.5


def _readable(blob: bytes) -> bytes:
    """A file's bytes as one searches them: a torch file (a checkpoint) is loaded and every bytes and
    string leaf laid out (torch pickles bytes as latin-1 strings: the raw bytes are not in the file)."""
    if not blob.startswith(b"PK"):
        return blob
    out = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k), walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, bytes):
            out.append(x)
        elif isinstance(x, str):
            out.append(x.encode())

    walk(torch.load(io.BytesIO(blob), weights_only=True))
    return b"|".join(out)


def _held_by_server(r: FlowerRun) -> tuple[bytes, bytes]:
    """(everything the server holds but its checkpoints, its checkpoints): the job, every reply it
    received, the run folder it wrote."""
    parts = [json.dumps({"config": json.loads(r.cfg.model_dump_json()), "run_dir": str(r.folder)}).encode()]
    for _, _, snap in r.grid.replies:
        for record in [*snap["config"].values(), *snap["metric"].values()]:
            for key, value in record.items():
                items = value if isinstance(value, list) else [value]
                parts += [key.encode(), *(v if isinstance(v, bytes) else repr(v).encode() for v in items)]
        parts += [a.tobytes() for record in snap["array"].values() for a in record.values()]
    files = [p for p in sorted(r.folder.rglob("*")) if p.is_file() and p.name != "checkpoint.pt"]
    published = [_readable(p.read_bytes()) for p in files]
    checkpoints = [_readable(b) for b in [*r.checkpoints, (r.folder / "checkpoint.pt").read_bytes()]]
    return b"".join(parts + published), b"".join(checkpoints)


@pytest.mark.parametrize("which", ["secret", "secure"])
def test_nothing_the_flower_server_holds_carries_a_clients_secret(runs, which):
    """The clients' secrets stay on their nodes (context.state and the node's snapshots): none is in
    the job, a reply or the run folder; the server's checkpoint holds the server's own secret (it
    resumes its stream from it) and no client's."""
    r = runs[which]
    (training,) = r.trainings
    own = training.server.streams.secrets[SERVER]
    clients = {}
    for context in r.grid.contexts.values():
        state = MethodState.from_records(context.state, "dpfpl")
        assert state.streams.mode == "secret"
        clients.update(state.streams.secrets)
    assert sorted(clients) == list(range(r.cfg.federation.n_clients))
    assert {own, *clients.values()} <= set(runs["entropy"].drawn) and own not in clients.values()
    held, checkpoints = _held_by_server(r)
    for secret in clients.values():
        for form in (secret, secret.hex().encode()):
            assert form not in held and form not in checkpoints
    assert own not in held and own.hex().encode() not in held
    if len(r.checkpoints) > 1:  # a mid-run checkpoint: the server's own secret, to continue its stream
        assert own in _readable(r.checkpoints[0])


def test_a_private_secret_flower_run_completes_with_a_formal_epsilon(runs):
    for which in ("secret", "secure"):
        r = runs[which]
        result = r.summary["methods"]["dpfpl"]
        assert r.summary["setup"]["randomness"] == "secret"
        assert result["formal_guarantee"] is True and result["randomness"] == "secret"
        assert result["epsilon_kind"] == "accounted" and 0 < result["epsilon"] < math.inf
        assert result["privacy"]["formal_guarantee"] is True
        assert all(why is None for why in result["privacy"]["holds_against"].values()), which
        rows = [json.loads(line) for line in (r.folder / "metrics.jsonl").read_text().splitlines()]
        assert all("loss" not in row and row["formal_guarantee"] and row["randomness"] == "secret" for row in rows)
    seeded = runs["seeded"].summary["methods"]["dpfpl"]
    assert seeded["formal_guarantee"] is False and seeded["randomness"] == "seeded"


def test_a_nodes_streams_round_trip_through_its_flower_state_and_its_snapshot(tmp_path):
    """MethodState keeps the hosted clients' secrets in a ConfigRecord (lists of bytes) and in the
    node's weights-only snapshot; both give back the same streams (same draws)."""
    from flwr.app import RecordDict

    from pfpl.privacy.accounting import Accountant

    for streams in (Streams.create(3, [0, 3], secret=True), Streams(3)):
        state = MethodState("run", 1, 0, {"local": torch.randn(2, 4)}, {}, [Accountant("rdp")] * 2, [1, 1], streams)
        records = RecordDict()
        state.to_records(records, "m")
        state.to_file(tmp_path / "s.pt")
        for back in (MethodState.from_records(records, "m"), MethodState.from_file(tmp_path / "s.pt")):
            assert back.streams.state_dict() == streams.state_dict()
            for c in (0, 3):
                a = back.streams.draws(Purpose.SAMPLE_NOISE, 1, 0, c).normal((5,))
                assert torch.equal(a, streams.draws(Purpose.SAMPLE_NOISE, 1, 0, c).normal((5,)))


def test_a_restarted_private_federation_continues_every_secret_stream(runs, monkeypatch):
    """The secret run killed after round 1 and resumed by a new ServerApp with fresh node contexts:
    the server's secret comes back from its checkpoint and each node's from its snapshot, so round 2
    draws exactly the noise of the uninterrupted run (a fresh secret would not)."""
    whole = runs["secret"]
    runs["entropy"].reset()  # the killed run draws the uninterrupted run's secrets again
    killed = _flower_run(runs["tmp"], "killed", whole.cfg, crash_after=1)
    assert killed.summary is None
    grid = InProcessGrid(3, whole.cfg.cache_dir, record=True)
    training, trainings = _cluster(whole.cfg, grid)
    resumed = resume(killed.folder, training=training)
    same(resumed, whole.summary, tol=0)
    (before,), (after_restart,) = whole.trainings, trainings
    assert after_restart.server.streams.secrets == before.server.streams.secrets  # from its checkpoint
    after = [values for kind, _, snap in grid.replies if kind == "train" for values in [snap["array"]["values"]]]
    assert len(after) == 6  # round 2: two steps on three nodes
    for (_, ours), theirs in zip(whole.uploads()[6:], after):
        assert max(_residuals(ours, theirs)) == 0.0


# ---- a server deviating with the uploads that wait for secure aggregation ------------------------------
def _deviating_setup(cache: Path):
    cfg = load_config(
        None,
        [
            *SMALL,
            f"cache_dir='{cache}'",
            "train.methods=['promptfl']",
            "federation.secure_aggregation=true",
            "secure.graph='full'",
        ],
    )
    bench = Benchmark(cfg)
    grid = InProcessGrid(3, cache)
    cluster = Cluster(grid, cfg, 3)
    cluster.connect(bench)
    training = FlowerTraining(cluster, bench, "promptfl")
    everyone = list(range(cfg.federation.n_clients))
    groups = cluster.by_node(everyone)
    payloads = {
        node: _content(
            training._header(round=0, step=0, steps=1, last=False, clients=clients),
            training.server.broadcast(torch.tensor(clients)),
        )
        for node, clients in groups.items()
    }
    assert set(cluster.send("train", payloads)) == set(groups)  # every upload now waits on its node
    return cfg, bench, grid, training


def _instance(training, clients: list[int]):
    """A protocol instance the server runs over the clients it names (full graph)."""
    from pfpl.secure.aggregator import GroupPlan
    from pfpl.secure.protocol import SecAggServer

    a = training.server.aggregator
    dim = math.prod(training.shapes["global"])
    threshold = a.settings.threshold_for(len(clients))
    graph = {c: [d for d in clients if d != c] for c in clients}
    plan = GroupPlan(list(range(len(clients))), clients, [], clients, {}, threshold, graph)
    server = SecAggServer(clients, graph, threshold, a.vector_length(dim), a.settings.ring_bits)
    return ("global", 0, None, plan, server, dim)


def _run_instances(secure: FlowerTraining, instances: dict, header: dict) -> dict:
    """Every phase of the instances, as the server drives them (its carrier's round trips, chosen by a
    deviating server); {key: decoded sum, or the error}."""
    from pfpl.secure.protocol import SecureAggregationError

    inbox = {key: inst[4].setup() for key, inst in instances.items()}
    out = {}
    for phase, method in zip(PHASE_MESSAGE, ("collect_keys", "collect_shares", "collect_masked", "collect_unmask")):
        plans = {k: inst[3] for k, inst in instances.items() if k in inbox}
        answers = secure.carrier.round_trip((header["round"], header["step"]), phase, inbox, plans)
        inbox = {}
        for key in [k for k in instances if k not in out]:
            try:
                inbox[key] = getattr(instances[key][4], method)(answers[key])
            except SecureAggregationError as err:
                out[key] = err
        inbox = {k: v for k, v in inbox.items() if k not in out}
    for key, total in inbox.items():
        out[key] = secure.server.aggregator.decode(total, None, 0, instances[key][5])
    return out


def _mean_of(grid, bench, clients: list[int]) -> torch.Tensor:
    """The size-weighted mean of the clients' pending uploads (read from their nodes: the test's view)."""
    rows = {}
    for context in grid.contexts.values():
        meta = context.state.config_records["promptfl/pending-meta"]
        values = R.from_arrays(context.state.array_records["promptfl/pending-values"])["global"]
        rows.update({int(c): values[i] for i, c in enumerate(meta["clients"])})
    sizes = bench.partition.sizes()
    total = sum(sizes[c] * rows[c].double().flatten() for c in clients)
    return total / sum(sizes[c] for c in clients)


def test_a_server_cannot_obtain_two_sums_of_one_exchange_that_differ_by_one_client(flower_cache, caplog):
    """Two instances of one parameter, one with client u and one without: each client's pending upload
    is consumed by the first instance masking it, so the second gets no masked input and fails — in
    one message, and when the server runs a second instance after the first sum."""
    from pfpl.secure.protocol import SecureAggregationError

    cfg, bench, grid, training = _deviating_setup(flower_cache)
    secure, header = training, training._header(round=0, step=0)
    everyone, without_u = [0, 1, 2, 3, 4], [1, 2, 3, 4]
    both = {"0.0": _instance(training, everyone), "0.1": _instance(training, without_u)}
    with caplog.at_level("WARNING"):
        got = _run_instances(secure, both, header)
    assert isinstance(got["0.1"], SecureAggregationError)  # the second finds every upload masked already
    expected = _mean_of(grid, bench, everyone)
    assert torch.allclose(got["0.0"], expected, atol=1e-5)  # the honest instance's sum
    assert sum("not masked a second time" in m for m in caplog.messages) == len(without_u)
    # the server asks again, for the sum without u, in a fresh advertise of the same exchange
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = _run_instances(secure, {"0.1": _instance(training, without_u)}, header)
    assert isinstance(again["0.1"], SecureAggregationError)
    assert sum("not masked a second time" in m for m in caplog.messages) == len(without_u)
    # and the same instance key again: refused as well
    again = _run_instances(secure, {"0.0": _instance(training, everyone)}, header)
    assert isinstance(again["0.0"], SecureAggregationError)


# ---- a server replaying the train message of an exchange it already aggregated -------------------------
def _past_an_honest_round(cache: Path, *extra):
    """An honest round 0 (the nodes snapshot its end), the federation then at round 1, step 0."""
    cfg = load_config(None, [*SMALL, f"cache_dir='{cache}'", "train.methods=['promptfl']", *extra])
    bench = Benchmark(cfg)
    grid = InProcessGrid(3, cache)
    cluster = Cluster(grid, cfg, 3)
    cluster.connect(bench)
    training = FlowerTraining(cluster, bench, "promptfl")
    training.run_round()
    training.evaluate()
    assert training.round == 1 and not cluster.rejected
    return cfg, bench, grid, training


def _train_payloads(training, step: int, clients: list[int], nudge: float = 0.0) -> dict:
    """The server's train messages of (round 1, ``step``); ``nudge``: other shared parameters."""
    payloads = {}
    for node, members in training.cluster.by_node(clients).items():
        shared = training.server.broadcast(torch.tensor(members))
        shared = {k: v + nudge for k, v in shared.items()}
        header = training._header(round=1, step=step, steps=1, last=False, clients=members)
        payloads[node] = _content(header, shared)
    return payloads


def _pending_rows(grid) -> dict[int, torch.Tensor]:
    rows = {}
    for context in grid.contexts.values():
        meta = context.state.config_records["promptfl/pending-meta"]
        values = R.from_arrays(context.state.array_records["promptfl/pending-values"])["global"]
        rows.update({int(c): values[i].clone() for i, c in enumerate(meta["clients"])})
    return rows


def _forget_the_ledgers(cfg, grid, training) -> None:
    """The nodes as they were before the release ledger: nothing recalls what they masked."""
    for context in grid.contexts.values():
        for key in ("promptfl/masked", "promptfl/released"):
            if key in context.state.config_records:
                del context.state.config_records[key]
    for path in (Path(cfg.cache_dir) / "flower-state" / training.run_id).glob("*-ledger.json"):
        path.unlink()


def test_a_replayed_train_message_cannot_feed_a_second_instance_of_its_exchange(flower_cache, caplog):
    """The server re-sends the train message of (round 1, step 0) after aggregating it: the node has
    moved on, retrains from its snapshot to the same upload (keyed by round, step and client), but its
    release ledger refuses to mask it again — a second instance without client u fails, so the
    server never holds two sums that differ by u. Nor does rewinding the node to step 0 let step 1 be
    masked again, nor a restarted node (empty context.state: the ledger file remains). Without the
    ledger (the node before it) the same moves give the server client u's vector exactly."""
    from pfpl.secure.protocol import SecureAggregationError

    cfg, bench, grid, training = _past_an_honest_round(
        flower_cache, "federation.secure_aggregation=true", "secure.graph='full'"
    )
    cluster, secure = training.cluster, training
    everyone, u = list(range(cfg.federation.n_clients)), 3
    without_u = [c for c in everyone if c != u]
    header = training._header(round=1, step=0)
    step0 = _train_payloads(training, 0, everyone)
    assert set(cluster.send("train", step0)) == set(grid.contexts)
    first = _pending_rows(grid)
    (honest,) = _run_instances(secure, {"0.0": _instance(training, everyone)}, header).values()
    assert torch.allclose(honest, _mean_of(grid, bench, everyone), atol=1e-5)  # the sum the server holds

    def refused(step: int, clients: list[int]) -> None:
        caplog.clear()
        with caplog.at_level("WARNING"):
            got = _run_instances(secure, {"0.0": _instance(training, clients)}, training._header(round=1, step=step))
        assert isinstance(got["0.0"], SecureAggregationError)  # every upload it names was masked already
        assert sum("not masked a second time" in m for m in caplog.messages) == len(clients)

    # the replay: accepted and retrained to the very same upload, but not masked a second time
    assert set(cluster.send("train", step0)) == set(grid.contexts) and not cluster.rejected
    assert all(torch.equal(first[c], v) for c, v in _pending_rows(grid).items())
    refused(0, without_u)
    # step 1, then a rewind to step 0 and step 1 again: step 1 is not masked a second time either
    step1 = _train_payloads(training, 1, everyone)
    assert set(cluster.send("train", step1)) == set(grid.contexts)
    (total,) = _run_instances(secure, {"0.0": _instance(training, everyone)}, training._header(round=1, step=1))
    assert not isinstance(total, Exception)
    assert set(cluster.send("train", step0)) == set(cluster.send("train", step1)) == set(grid.contexts)
    refused(1, without_u)
    # restarted nodes (their Flower state gone but the server's hello) reload round 1 from the snapshot:
    # the ledger file stands
    for context in grid.contexts.values():
        hello = context.state.config_records["pfpl/config"]
        context.state = RecordDict()
        context.state.config_records["pfpl/config"] = hello
    assert set(cluster.send("train", step0)) == set(grid.contexts)
    refused(0, without_u)
    assert not cluster.rejected

    # the attack works on a node without the ledger (so this test can fail): two sums, u's vector
    _forget_the_ledgers(cfg, grid, training)
    assert set(cluster.send("train", step0)) == set(grid.contexts)
    (again,) = _run_instances(secure, {"0.0": _instance(training, without_u)}, header).values()
    sizes = bench.partition.sizes()
    n_all, n_without = sum(sizes[c] for c in everyone), sum(sizes[c] for c in without_u)
    recovered = (n_all * honest.double() - n_without * again.double()) / sizes[u]
    assert torch.allclose(recovered.float(), first[u].flatten(), atol=1e-4)


def test_a_private_node_sends_one_upload_per_exchange_in_the_clear(flower_cache):
    """Feature DP in the clear: a replayed train message of (round 1, step 0) gets the very same noisy
    upload (nothing new); one with other shared parameters is refused — it would carry the same noise
    on another gradient, so the two would differ by a noise-free quantity, as the node without the
    ledger shows."""
    cfg, bench, grid, training = _past_an_honest_round(flower_cache, *PRIVATE[:3])
    cluster, everyone = training.cluster, list(range(cfg.federation.n_clients))

    def uploads(replies) -> torch.Tensor:
        return torch.cat([R.from_arrays(replies[n].array_records[R.VALUES])["global"] for n in sorted(replies)])

    first = uploads(cluster.send("train", _train_payloads(training, 0, everyone)))
    again = uploads(cluster.send("train", _train_payloads(training, 0, everyone)))
    assert torch.equal(first, again) and not cluster.rejected
    assert not cluster.send("train", _train_payloads(training, 0, everyone, nudge=0.05))
    assert len(cluster.rejected) == 3 and all("is not sent" in r["reason"] for r in cluster.rejected)
    assert torch.equal(first, uploads(cluster.send("train", _train_payloads(training, 0, everyone))))
    # without the ledger: the same noise, so the difference is far below the noise's scale
    _forget_the_ledgers(cfg, grid, training)
    other = uploads(cluster.send("train", _train_payloads(training, 0, everyone, nudge=0.05)))
    gap = (first - other).flatten(1).norm(dim=1) / first.flatten(1).norm(dim=1)
    assert 0 < gap.max() < 0.1  # two independent draws would be ≈ √2 apart
