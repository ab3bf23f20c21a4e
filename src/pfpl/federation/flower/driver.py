"""The server side on Flower: the SuperNodes as a :class:`Cluster` (who hosts which client, checked
round trips), and one method's federation as a :class:`FlowerTraining` that
:func:`pfpl.federation.runner.run` drives exactly as it drives the simulator.

A round is the simulator's round with the client calls replaced by messages: the server picks the
participants, sends each node the shared parameters its participating clients received, takes
their uploads back and aggregates them with the same :class:`~pfpl.federation.server.Server` and
aggregator (DP wrappers, secure aggregation). Every field of every reply is validated before use
(header, record names, client lists, sizes, arrays, scores, secure-aggregation entries): a reply
with a wrong key, type, shape, client list or size, or a non-finite value, is rejected with a logged
reason naming the node (and client) and not used — its clients are treated as dropped for that
exchange, as is a node that does not answer within the timeout; no reply can crash the server. A
secure-aggregation instance that cannot complete is skipped and recorded, and the run goes on.
Evaluation runs on the nodes, which return their clients' accuracies and ε (the personalized
prompts stay there).

In a private run a node's messages carry only the mechanism's outputs (the noised shared values, or
protocol messages that mask them), public metadata (client ids, record counts, fingerprints) and
the evaluation scores and ε the protocol defines — never a training loss or any other un-noised
value.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from pfpl.algorithms import get_method
from pfpl.artifacts import RunFolder
from pfpl.config import Config
from pfpl.errors import DeploymentError, ProtocolError
from pfpl.evaluation.federated import client_scores, summarize
from pfpl.federation.client import steps_per_round
from pfpl.federation.flower import records as R
from pfpl.federation.flower.node import flower_refusal, hosted_clients
from pfpl.federation.runner import Benchmark, build_aggregator, method_settings, run_streams, train_settings
from pfpl.federation.server import Server
from pfpl.messages import Upload
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.modes import is_private
from pfpl.streams import SERVER, Purpose, Streams, stream

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """The SuperNodes of a run and what each hosts; every exchange goes through :meth:`send`."""

    grid: object  # flwr.serverapp.Grid
    cfg: Config
    nodes: int  # SuperNodes expected (each hosts the clients c with c mod nodes = its partition-id)
    timeout: float = 600.0  # seconds to wait for the replies of one exchange
    wait: float = 120.0  # seconds to wait for the SuperNodes to connect
    hosted: dict[int, list[int]] = field(default_factory=dict)  # node id -> its clients
    node_of: dict[int, int] = field(default_factory=dict)  # client -> node id
    rejected: list[dict] = field(default_factory=list)  # every rejected reply, with its reason

    def connect(self, bench: Benchmark) -> None:
        """Wait for the SuperNodes, ask each which clients it hosts, and check that together they host
        every client exactly once, with the training-set sizes and fingerprints the server expects."""
        deadline = time.time() + self.wait
        ids: list[int] = []
        while time.time() < deadline:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= self.nodes:
                break
            time.sleep(0.5)
        if len(ids) < self.nodes:
            raise DeploymentError(
                f"{len(ids)} SuperNode(s) connected within {self.wait:.0f} s; the run needs {self.nodes}"
            )
        config = self.cfg.model_dump_json()
        payloads = {n: _content({"config": config, "num_partitions": self.nodes}) for n in ids}
        replies = self.send("query", payloads)
        sizes = bench.partition.sizes()
        expect = {"backbone": bench.backbone.fingerprint, "dataset": bench.dataset.fingerprint}
        for node, reply in replies.items():
            try:
                only_records(reply, {R.PFPL})
                head = R.header(reply, {"partition_id", "clients", "sizes", "backbone", "dataset"})
                got = {"backbone": R.text(head, "backbone"), "dataset": R.text(head, "dataset")}
                clients, node_sizes = R.int_list(head, "clients"), R.int_list(head, "sizes")
                partition = R.integer(head, "partition_id")
                if clients != hosted_clients(len(sizes), partition, self.nodes):
                    raise ProtocolError(f"partition {partition} of {self.nodes} does not host clients {clients}")
            except (ProtocolError, ValueError) as err:
                self._reject(node, "query", str(err))
                continue
            if got != expect:
                raise DeploymentError(f"SuperNode {node} has {got}, the server {expect}: not the same model or data")
            if node_sizes != [sizes[c] for c in clients]:
                raise DeploymentError(f"SuperNode {node} reports other training-set sizes for clients {clients}")
            for c in clients:
                if c in self.node_of:
                    raise DeploymentError(f"client {c} is hosted by SuperNodes {self.node_of[c]} and {node}")
                self.node_of[c] = node
            self.hosted[node] = clients
        missing = sorted(set(range(self.cfg.federation.n_clients)) - set(self.node_of))
        if missing:
            raise DeploymentError(f"no SuperNode hosts client(s) {missing} (check partition-id / num-partitions)")
        log.info("flower: %d SuperNodes host %d clients", len(self.hosted), len(self.node_of))

    def send(self, kind: str, payloads: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """One round trip; the replies that arrived without error, by node (others are logged)."""
        messages = [Message(content, dst_node_id=node, message_type=kind) for node, content in payloads.items()]
        replies: dict[int, RecordDict] = {}
        failed = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in payloads or node in replies or node in failed:
                log.warning("flower: ignored a %s reply of SuperNode %s: not asked for, or a second one", kind, node)
                continue
            if reply.has_error():
                self._reject(node, kind, f"the node failed: {reply.error.reason}")
                failed.add(node)
                continue
            replies[node] = reply.content
        for node in payloads:
            if node not in replies and node not in failed:
                self._reject(node, kind, f"no reply within {self.timeout:.0f} s")
        return replies

    def _reject(self, node: int, kind: str, why: str) -> None:
        log.warning("flower: %s reply of SuperNode %d rejected: %s", kind, node, why)
        self.rejected.append({"node": node, "kind": kind, "reason": why})

    def by_node(self, clients: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c in clients:
            out.setdefault(self.node_of[c], []).append(c)
        return out


def only_records(reply: RecordDict, configs: set[str], arrays: frozenset[str] = frozenset(), prefix: str = "") -> None:
    """The reply holds exactly these config and array records (and, if ``prefix``, any config record
    whose name starts with it); no metric record. Else a ProtocolError naming the stray ones."""
    names = {k for k in reply.config_records if not (prefix and k.startswith(prefix))}
    if names != configs or set(reply.array_records) != set(arrays) or len(reply.metric_records):
        have = sorted(reply.config_records) + sorted(reply.array_records) + sorted(reply.metric_records)
        raise ProtocolError(f"the reply holds records {have}, expected {sorted(configs | set(arrays))}")


def _content(header: dict, shared: dict[str, torch.Tensor] | None = None) -> RecordDict:
    content = RecordDict()
    content.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, **header})
    if shared:
        content.array_records[R.SHARED] = R.to_arrays(shared)
    return content


class FlowerTraining:
    """One method's federation on Flower (the :class:`~pfpl.federation.runner.MethodTraining` protocol)."""

    def __init__(self, cluster: Cluster, bench: Benchmark, name: str):
        why = flower_refusal(name)
        if why:
            raise DeploymentError(why)
        cfg = bench.cfg
        self.cluster, self.bench, self.name, self.cfg = cluster, bench, name, cfg
        self.settings = train_settings(cfg)
        self.method = get_method(name)(method_settings(cfg, bench.backbone))
        self.sizes = bench.partition.sizes()
        dim = bench.backbone.ctx_dim
        self.plan = bench.privacy_plan(name)
        shared = self.method.init_shared(cfg.prompt.n_ctx, dim, stream(self.settings.seed, Purpose.INIT_SHARED))
        _, server_streams = run_streams(cfg, 0)  # the server's own secret; the clients' stay on their nodes
        aggregator = build_aggregator(cfg, self.plan)
        self.server = Server(self.method, self.settings, len(self.sizes), shared, aggregator, streams=server_streams)
        self.local_steps = steps_per_round(self.sizes, self.settings)
        self.steps_per_round = self.local_steps * len(self.method.stages())
        self.client_level = Accountant(self.plan.accountant)
        self.epsilons = [0.0] * len(self.sizes)
        self.run_id = uuid.uuid4().hex  # names this method's state on the nodes; kept across a resume
        self.shapes = {k: tuple(v.shape) for k, v in shared.items()}
        self.secure = SecureOverMessages(self.cluster, self.server.aggregator, self.server.streams, self.shapes)
        # the scores a node's evaluation reply carries: those the server's evaluation plan defines
        self._score_keys = set(client_scores(torch.zeros(0, 1, 1), [], bench.test, bench.plan))
        self.secure_seconds = 0.0  # time spent in secure-aggregation round trips (pfpl bench --flower)
        self.train_seconds = 0.0  # time spent in training rounds, secure aggregation included

    @property
    def round(self) -> int:
        return self.server.round

    def _header(self, **extra) -> dict:
        return {"method": self.name, "run": self.run_id, **extra}

    def exchange(self, active: list[int], r: int, step: int, steps: int, last: bool) -> Upload:
        """The participants on every node take ``steps`` steps; the server receives their uploads (in
        the clear, or summed by the secure-aggregation protocol over further round trips)."""
        groups = self.cluster.by_node(active)
        payloads = {}
        for node, clients in groups.items():
            ids = torch.tensor(clients, dtype=torch.long)
            header = self._header(round=r, step=step, steps=steps, last=last, clients=clients)
            payloads[node] = _content(header, self.server.broadcast(ids))
        replies = self.cluster.send("train", payloads)
        if self.cfg.federation.secure_aggregation:
            return self._secure(active, groups, replies, r, step)
        parts: dict[int, Upload] = {}
        for node, reply in replies.items():
            try:
                parts[node] = self._upload(reply, groups[node])
            except (ValueError, TypeError) as err:  # ProtocolError is a ValueError
                self.cluster._reject(node, "train", str(err))
        rows = [(c, node) for c in active for node in [self.cluster.node_of[c]] if node in parts]
        upload = _ordered(parts, rows, self.shapes)
        self.server.receive(upload, r, step)
        return upload

    def _secure(self, active: list[int], groups: dict, replies: dict, r: int, step: int) -> Upload:
        """The nodes kept their uploads; the server learns only each group's sum."""
        delivered = set()
        for node, reply in replies.items():
            try:
                only_records(reply, {R.PFPL})  # the values stay on the node until they are masked
                got = R.int_list(R.header(reply, {"clients"}), "clients")
                if got != groups[node]:
                    raise ProtocolError(f"answered for clients {got}, asked {groups[node]}")
                delivered.update(got)
            except ProtocolError as err:
                self.cluster._reject(node, "train", str(err))
        clients = [c for c in active if c in delivered]
        ids = torch.tensor(clients, dtype=torch.long)
        sizes = torch.tensor([float(self.sizes[c]) for c in clients])
        unseen = {k: torch.zeros(len(clients), *s) for k, s in self.shapes.items()}  # the server never sees values
        upload = Upload(ids, unseen, sizes, torch.full((len(clients),), math.nan))
        if not self.settings.train_shared or not self.server.shared:
            return upload
        kept, drops = self.server.deliver(upload, r, step)
        contributions = {
            name: self.server.contributions(kept, drops, name, r, step) for name in self.method.shared_params
        }
        t0 = time.perf_counter()
        sums, released = self.secure.aggregate(contributions, self._header(round=r, step=step))
        self.secure_seconds += time.perf_counter() - t0
        for name in contributions:
            self.server.apply(name, sums[name], released[name], r)
        return upload

    def _upload(self, reply: RecordDict, clients: list[int]) -> Upload:
        """A node's plaintext upload: the shared values and the clients' record counts (and, in a
        non-private run only, their training loss); anything else is a ProtocolError."""
        only_records(reply, {R.PFPL}, frozenset({R.VALUES, R.STATS}))
        got = R.int_list(R.header(reply, {"clients"}), "clients")
        if got != clients:
            raise ProtocolError(f"answered for clients {got}, asked {clients}")
        b = len(clients)
        values = R.check_tensors(
            R.from_arrays(reply.array_records[R.VALUES]), {k: (b, *s) for k, s in self.shapes.items()}, "upload"
        )
        stats = R.from_arrays(reply.array_records[R.STATS])
        private = is_private(self.cfg.dp)
        if private and "loss" in stats:
            raise ProtocolError("a private run's upload carries the clients' training loss (not a mechanism output)")
        expected = {"sizes": (b,), **({"loss": (b,)} if "loss" in stats else {})}
        stats = R.check_tensors(stats, expected, "upload statistics")
        if [float(x) for x in stats["sizes"].tolist()] != [float(self.sizes[c]) for c in clients]:
            raise ProtocolError(f"training-set sizes {stats['sizes'].tolist()} differ from the clients' own")
        ids = torch.tensor(clients, dtype=torch.long)
        loss = stats["loss"].float() if "loss" in stats else torch.full((b,), math.nan)  # withheld
        return Upload(ids, {k: v.float() for k, v in values.items()}, stats["sizes"].float(), loss)

    def run_round(self) -> dict:
        start = time.perf_counter()
        failures = getattr(self.server.aggregator, "failures", None)
        failed_before = 0 if failures is None else len(failures)
        r = self.server.round
        active = self.server.participants(r).tolist()
        if self.settings.sync == "step":
            losses = [
                self.exchange(active, r, k, 1, last=k == self.local_steps - 1).loss for k in range(self.local_steps)
            ]
            loss = torch.cat(losses).mean() if losses else torch.tensor(float("nan"))
        else:
            loss = self.exchange(active, r, 0, self.steps_per_round, last=True).loss.mean()
        self.plan.charge_client_level(self.client_level)
        self.server.end_round()
        self.train_seconds += time.perf_counter() - start
        info = {"loss": float(loss), "lr": self.settings.lr_at(r), "participants": len(active)}
        if failures is not None:  # secure aggregation: instances skipped this round (as the simulator)
            info["secure_failures"] = len(failures) - failed_before
        return info

    def evaluate(self) -> dict:
        payloads = {}
        for node, clients in self.cluster.hosted.items():
            ids = torch.tensor(clients, dtype=torch.long)
            payloads[node] = _content(self._header(round=self.server.round), self.server.broadcast(ids))
        replies = self.cluster.send("evaluate", payloads)
        per_client: dict[str, list[float]] = {}
        n = len(self.sizes)
        evaluated: set[int] = set()
        for node, reply in replies.items():
            try:
                clients, eps, scores = self._scores(reply, self.cluster.hosted[node])
            except ProtocolError as err:
                self.cluster._reject(node, "evaluate", str(err))
                continue
            for key, values in scores.items():
                row = per_client.setdefault(key, [math.nan] * n)
                for c, v in zip(clients, values):
                    row[c] = v
            for c, e in zip(clients, eps):
                self.epsilons[c] = e
            evaluated.update(clients)
        missing = [c for c in range(n) if c not in evaluated]
        if missing:
            log.warning("flower: clients %s were not evaluated this round (their SuperNode did not answer)", missing)
        if not per_client:
            raise DeploymentError("no SuperNode answered the evaluation")
        return summarize(per_client)

    def _scores(self, reply: RecordDict, clients: list[int]) -> tuple[list[int], list[float], dict[str, list[float]]]:
        """A node's evaluation: its clients, their ε (≥ 0, ∞ allowed) and exactly the scores the server's
        evaluation plan defines (accuracies in [0, 1], NaN where a client has no such test images)."""
        only_records(reply, {R.PFPL})
        head = R.header(reply, {"clients", "epsilon", *(f"score/{k}" for k in self._score_keys)})
        got = R.int_list(head, "clients")
        if got != clients:
            raise ProtocolError(f"answered for clients {got}, asked {clients}")
        eps = R.float_list(head, "epsilon", len(clients))
        if any(math.isnan(e) or e < 0 for e in eps):
            raise ProtocolError(f"ε {eps} is not a list of non-negative numbers")
        scores = {k: R.float_list(head, f"score/{k}", len(clients)) for k in sorted(self._score_keys)}
        for key, values in scores.items():
            if not all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values):
                raise ProtocolError(f"score {key!r} {values} is not a list of accuracies in [0, 1]")
        return got, eps, scores

    def privacy_record(self) -> dict:
        client_level = self.client_level.epsilon(self.plan.delta) if self.plan.client_sigma > 0 else None
        worst = max(self.epsilons)
        return {
            "epsilon": R.finite_or_none(worst),
            "epsilon_per_client": [R.finite_or_none(e) for e in self.epsilons],
            "epsilon_kind": self.plan.epsilon_kind,
            "formal_guarantee": self.plan.formal(),
            "randomness": self.plan.randomness,
            "client_level_epsilon": client_level,
        }

    def state_dict(self) -> dict:
        """What a resumed server needs: its own state (its own secret among it, never a client's: those
        stay on the nodes), the ε it last heard, and the secure instances it skipped."""
        return {
            "server": self.server.state_dict(),
            "client_level": self.client_level.state_dict(),
            "epsilons": list(self.epsilons),
            "run_id": self.run_id,
            "secure_failures": list(getattr(self.server.aggregator, "failures", [])),
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.client_level = Accountant.from_state(state["client_level"])
        self.epsilons = list(state["epsilons"])
        self.run_id = str(state["run_id"])
        if hasattr(self.server.aggregator, "failures"):
            self.server.aggregator.failures[:] = state.get("secure_failures", [])

    def finish(self, folder: RunFolder) -> dict:
        failures = getattr(self.server.aggregator, "failures", None)
        return {
            **({} if failures is None else {"secure_failures": len(failures)}),
            "privacy": self.plan.describe(),
            "flower": {
                "supernodes": len(self.cluster.hosted),
                "rejected_replies": len(self.cluster.rejected),
                "train_s": round(self.train_seconds, 3),  # this server process's rounds (not before a resume)
                "secure_aggregation_s": round(self.secure_seconds, 3),
                "released_prompts": "kept on the SuperNodes (not collected by the server)",
            },
        }


def _ordered(parts: dict[int, Upload], rows: list[tuple[int, int]], shapes: dict[str, tuple]) -> Upload:
    """The delivered uploads as one, rows in the participants' order (the simulator's order)."""
    if not rows:
        none = torch.zeros(0, dtype=torch.long)
        return Upload(none, {k: torch.zeros(0, *s) for k, s in shapes.items()}, torch.zeros(0), torch.zeros(0))
    position = {node: {int(c): i for i, c in enumerate(u.clients.tolist())} for node, u in parts.items()}
    take = [(node, position[node][c]) for c, node in rows]
    return Upload(
        torch.tensor([c for c, _ in rows], dtype=torch.long),
        {k: torch.stack([parts[n].values[k][i] for n, i in take]) for k in shapes},
        torch.stack([parts[n].sizes[i] for n, i in take]),
        torch.stack([parts[n].loss[i] for n, i in take]),
    )


@dataclass
class SecureOverMessages:
    """pfpl's SecAgg+ carried over Flower round trips: one protocol instance per shared parameter and
    group, all instances of an exchange advancing together, four round trips (advertise keys, share
    keys, masked input, unmasking). The server plans each instance and decodes its sum with the same
    :class:`~pfpl.secure.aggregator.SecureAggregator` as the simulator; the nodes encode, mask and
    answer. Simulated dropouts (``federation.dropout``) stop a client at its drawn phase, as in the
    simulator; a node that does not answer drops all its clients from that phase on, and an answer
    that is malformed, unasked for or of the wrong type drops its client. An instance that cannot
    complete (too few survivors or shares) is skipped — recorded with the aggregator's
    ``record_failure`` and not applied — while the others go on."""

    cluster: Cluster
    aggregator: object  # pfpl.secure.aggregator.SecureAggregator
    streams: Streams  # the server's own mechanism draws (noise for a group nobody joined)
    shapes: dict[str, tuple]

    def aggregate(self, contributions: dict, header: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each shared parameter's group sums ``[G, ...]`` and the groups the server may apply ``[G]``
        (the aggregator's ``releases``: those that contributed, less the instances that failed)."""
        from pfpl.secure.protocol import SecAggServer, SecureAggregationError

        a = self.aggregator
        sums: dict[str, torch.Tensor] = {}
        instances: dict[str, tuple] = {}
        failed: dict[str, dict[int, Exception]] = {name: {} for name in contributions}
        for name, c in contributions.items():
            dim = math.prod(self.shapes[name])
            sums[name] = torch.zeros(c.n_groups, dim, dtype=torch.float64)
            for g in range(c.n_groups):
                plan = a.plan_group(c, g)
                if plan is None:
                    draws = self.streams.draws(Purpose.SERVER_NOISE, c.round, c.step, SERVER, c.index)
                    sums[name][g] = a.empty(c, g, dim, draws)
                    continue
                server = SecAggServer(
                    plan.everyone, plan.graph, plan.threshold, a.vector_length(dim), a.settings.ring_bits
                )
                instances[f"{c.index}.{g}"] = (name, g, c, plan, server, dim)
        inbox = {key: inst[4].setup() for key, inst in instances.items()}
        collect = {
            "advertise": "collect_keys",
            "share": "collect_shares",
            "masked": "collect_masked",
            "unmask": "collect_unmask",
        }
        for phase, method in collect.items():
            answers = self._round_trip(phase, inbox, instances, header)
            inbox = {}
            for key in list(instances):
                try:
                    inbox[key] = getattr(instances[key][4], method)(answers[key])
                except SecureAggregationError as err:  # this instance is skipped; the others go on
                    name, g = instances.pop(key)[:2]
                    failed[name][g] = err
        for key, total in inbox.items():
            name, g, c, plan, server, dim = instances[key]
            sums[name][g] = a.decode(total, c, g, dim)
        released = {}
        for name, c in contributions.items():
            for g, err in failed[name].items():
                a.record_failure(c, g, err)
            released[name] = a.releases(c)  # those that contributed, less this exchange's failed instances
        shaped = {name: s.reshape(len(s), *self.shapes[name]).float() for name, s in sums.items()}
        return shaped, released

    def _round_trip(self, phase: str, inbox: dict, instances: dict, header: dict) -> dict[str, list]:
        """One phase's messages to the nodes, and the answers by instance: only those asked for (this
        phase, this instance, a client of the answering node), of the phase's type and sent by their
        client; every other entry is rejected with its reason (its client is then treated as
        dropped), and a reply with a bad header or stray records is rejected whole."""
        from pfpl.secure import wire
        from pfpl.secure.protocol import PHASES, AdvertiseKeys, EncryptedShares, MaskedInput, UnmaskShares

        expected = {"advertise": AdvertiseKeys, "share": EncryptedShares, "masked": MaskedInput, "unmask": UnmaskShares}
        order = PHASES.index(phase)
        payloads: dict[int, RecordDict] = {}
        asked: dict[int, set[tuple[str, int]]] = {}
        for key, messages in inbox.items():
            plan = instances[key][3]
            for client, message in messages.items():
                if client in plan.drops and PHASES.index(plan.drops[client]) <= order:
                    continue  # a simulated dropout: gone before this phase
                node = self.cluster.node_of[client]
                if node not in payloads:
                    payloads[node] = _content({**header, "phase": phase})
                    asked[node] = set()
                fields = wire.to_fields(message)
                if phase == "advertise":
                    fields["summands"] = len(plan.everyone)
                payloads[node].config_records[f"secagg/{key}/{client}"] = ConfigRecord(fields)
                asked[node].add((key, client))
        answers: dict[str, list] = {key: [] for key in inbox}
        what = f"secure aggregation ({phase})"
        replies = self.cluster.send("train.secagg", payloads)
        for node, reply in replies.items():
            try:
                only_records(reply, {R.PFPL}, prefix="secagg/")
                got = R.text(R.header(reply, {"phase"}), "phase")
                if got != phase:
                    raise ProtocolError(f"answered phase {got!r}, asked {phase!r}")
            except ProtocolError as err:
                self.cluster._reject(node, what, str(err))
                continue
            for entry, record in reply.config_records.items():
                if entry == R.PFPL:
                    continue
                try:
                    key, client = R.secagg_entry(entry)
                    if (key, client) not in asked[node]:
                        raise ProtocolError(f"an answer for {entry} it was not asked for")
                    message = wire.from_fields(dict(record), expected[phase])
                    if message.sender != client:
                        raise ProtocolError(f"{entry} answered by client {message.sender}")
                    answers[key].append(message)
                except (ValueError, TypeError) as err:  # ProtocolError is a ValueError
                    self.cluster._reject(node, what, f"{entry}: {err}")
        for node in replies:
            missing = sorted(asked[node] - {R.secagg_entry(e) for e in replies[node].config_records if _entry(e)})
            if missing:
                log.warning("flower: SuperNode %d did not answer for %s at %s (dropped)", node, missing, phase)
        return answers


def _entry(key: str) -> bool:
    try:
        R.secagg_entry(key)
        return True
    except ProtocolError:
        return False
