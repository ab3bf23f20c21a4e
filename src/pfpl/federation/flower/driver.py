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
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode

from pfpl.algorithms import get_method, spec
from pfpl.artifacts import RunFolder
from pfpl.config import Config
from pfpl.errors import DeploymentError, ProtocolError
from pfpl.evaluation.federated import client_scores, summarize
from pfpl.federation.client import steps_per_round
from pfpl.federation.context import Benchmark
from pfpl.federation.flower import records as R
from pfpl.federation.flower.node import flower_refusal, hosted_clients, model_digest
from pfpl.federation.flower.secure_carrier import MessageCarrier
from pfpl.federation.report import fedsp_record, grouping, privacy_record
from pfpl.federation.rounds import Rounds
from pfpl.federation.server import Server
from pfpl.federation.wiring import build_aggregator, method_settings, plan_for, run_streams, train_settings
from pfpl.messages import Upload
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.modes import is_private
from pfpl.streams import Purpose, stream

log = logging.getLogger(__name__)

POLL_MIN_S = 0.005  # Cluster.send: the first pause between pulls of replies; it grows 1.5× a pull ...
POLL_MAX_S = 0.1  # ... up to this (a reply waits at most this long on the SuperLink)
UNAVAILABLE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}  # the SuperLink's, for a node


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
            why = "; ".join(f"SuperNode {r['node']}: {r['reason']}" for r in self.rejected if r["kind"] == "query")
            raise DeploymentError(
                f"no SuperNode hosts client(s) {missing} (check partition-id / num-partitions)"
                + (f"; rejected: {why}" if why else "")
            )
        log.info("flower: %d SuperNodes host %d clients", len(self.hosted), len(self.node_of))

    def send(self, kind: str, payloads: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """One round trip; the replies that arrived without error, by node (others are logged).

        The messages are pushed at once and their replies pulled as they arrive, polling the SuperLink
        every few milliseconds at first and at most every ``POLL_MAX_S`` (Flower's own
        ``send_and_receive`` sleeps 3 s between pulls)."""
        nodes = list(payloads)
        messages = [Message(payloads[node], dst_node_id=node, message_type=kind) for node in nodes]
        pushed = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}  # message id -> the node it went to
        for i, node in enumerate(nodes):
            mid = pushed[i] if i < len(pushed) else None  # None: Flower could not push that one
            if mid:
                pending[str(mid)] = node
            else:
                self._reject(node, kind, "the message could not be pushed to the SuperLink")
        replies: dict[int, RecordDict] = {}
        failed = set(nodes) - set(pending.values())
        deadline = time.monotonic() + self.timeout
        delay = POLL_MIN_S
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid, src = str(reply.metadata.reply_to_message_id), reply.metadata.src_node_id
                node = pending.get(mid)
                if node is not None and reply.has_error() and reply.error.code in UNAVAILABLE:
                    # the SuperLink answers for a node that stopped heart-beating, or a reply that expired
                    self._reject(pending.pop(mid), kind, f"no reply: {reply.error.reason}")
                    failed.add(node)
                    continue
                if node is None or src != node:
                    log.warning("flower: ignored a %s reply of SuperNode %s: not asked for, or a second one", kind, src)
                    continue
                del pending[mid]
                if reply.has_error():
                    self._reject(node, kind, f"the node failed: {reply.error.reason}")
                    failed.add(node)
                    continue
                replies[node] = reply.content
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(POLL_MAX_S, delay * 1.5)
        for node in nodes:
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


PHASE = "phase"  # a server phase's per-client records: phase/{client}


only_records = R.only_records
_content = R.content


class FlowerTraining:
    """One method's federation on Flower (the :class:`~pfpl.federation.runner.MethodTraining` protocol)."""

    def __init__(self, cluster: Cluster, bench: Benchmark, name: str):
        why = flower_refusal(name)
        if why:
            raise DeploymentError(why)
        cfg = bench.cfg
        self.cluster, self.bench, self.name, self.cfg = cluster, bench, name, cfg
        self.settings = train_settings(cfg)
        settings = method_settings(cfg, bench.backbone)
        self.sizes = bench.partition.sizes()
        dim = bench.backbone.ctx_dim
        if spec(name).auxiliary:  # FedSP: the server distils the auxiliary model and ships it once
            from pfpl.federation.fedsp import method_extra

            self.fedsp = bench.fedsp(get_method(name).distilled)
            settings.extra.update(method_extra(self.fedsp, bench))
            self.method = get_method(name)(settings)
            self.plan = plan_for(cfg, self.method, self.sizes, self.settings, dim)
            self._ship_model(cluster, name, self.fedsp.aux.model.state_dict())
        else:
            self.fedsp = None
            self.method = get_method(name)(settings)
            self.plan = bench.privacy_plan(name)
        shared = self.method.init_shared(cfg.prompt.n_ctx, dim, stream(self.settings.seed, Purpose.INIT_SHARED))
        _, server_streams = run_streams(cfg, 0)  # the server's own secret; the clients' stay on their nodes
        aggregator = build_aggregator(cfg, self.plan)
        self.carrier = None
        if cfg.federation.secure_aggregation:  # the same aggregator as the simulator's, its clients over messages
            self.carrier = aggregator.carrier = MessageCarrier(
                cluster, lambda r, step: self._header(round=r, step=step)
            )
        self.server = Server(self.method, self.settings, len(self.sizes), shared, aggregator, streams=server_streams)
        local_steps = steps_per_round(self.sizes, self.settings)
        steps = local_steps * len(self.method.stages())
        self.rounds = Rounds(
            self.server,
            self,
            self.settings,
            local_steps,
            steps,
            self.plan,
            Accountant(self.plan.accountant),
            self.method.server_phases(),
        )
        self.epsilons = [0.0] * len(self.sizes)
        self.run_id = uuid.uuid4().hex  # names this method's state on the nodes; kept across a resume
        self.shapes = {k: tuple(v.shape) for k, v in shared.items()}
        # the scores a node's evaluation reply carries: those the server's evaluation plan defines
        self._score_keys = set(client_scores(torch.zeros(0, 1, 1), [], bench.test, bench.plan))
        if self.fedsp is not None:  # and each client's own product (its auxiliary model), scored on its node
            self._score_keys |= {f"aux/{k}" for k in self._score_keys}
        self.auxiliary: dict | None = None  # the last evaluation's scores of those products
        self.train_seconds = 0.0  # time spent in training rounds, secure aggregation included

    @staticmethod
    def _ship_model(cluster: Cluster, name: str, weights: dict[str, torch.Tensor]) -> None:
        """FedSP's auxiliary model to every SuperNode (once per run); a node that does not take it
        cannot train the method: that is a deployment error naming it."""
        # Flower's Array carries a 0-d tensor as shape [1]: send it so (the node restores the shape)
        weights = {k: v.detach().cpu().contiguous().reshape(v.shape or (1,)) for k, v in weights.items()}
        digest = model_digest(weights)
        arrays = R.to_arrays(weights)  # converted once, the same record in every node's message
        payloads = {}
        for node in cluster.hosted:
            content = _content({"method": name, "digest": digest})
            content.array_records["weights"] = arrays
            payloads[node] = content
        replies = cluster.send("query.model", payloads)
        for node in cluster.hosted:
            try:
                if node not in replies:
                    raise ProtocolError("no reply")
                only_records(replies[node], {R.PFPL})
                if R.text(R.header(replies[node], {"digest"}), "digest") != digest:
                    raise ProtocolError("it acknowledged another model")
            except ProtocolError as err:
                raise DeploymentError(f"SuperNode {node} did not take {name}'s auxiliary model: {err}") from None
        log.info("flower: %s's auxiliary model (%s) shipped to %d SuperNodes", name, digest[:12], len(cluster.hosted))

    @property
    def round(self) -> int:
        return self.server.round

    def _header(self, **extra) -> dict:
        return {"method": self.name, "run": self.run_id, **extra}

    @property
    def client_level(self) -> Accountant:
        return self.rounds.client_level

    @property
    def phases(self) -> list:
        return self.rounds.phases

    @property
    def secure_seconds(self) -> float:
        """Time spent in secure-aggregation round trips (pfpl bench --flower)."""
        return self.carrier.seconds if self.carrier is not None else 0.0

    def exchange(self, ids, shared, r: int, step: int, steps: int, last: bool) -> Upload:
        """The transport's exchange (:class:`~pfpl.federation.rounds.Transport`): the participants on
        every node take ``steps`` steps from the shared values each received; returns what the nodes
        delivered — their uploads, or, under secure aggregation, which clients hold one (the server
        never sees the values: its aggregator's session asks the nodes to mask them)."""
        active = [int(c) for c in ids.tolist()]
        position = {c: i for i, c in enumerate(active)}
        groups = self.cluster.by_node(active)
        payloads = {}
        for node, clients in groups.items():
            rows = torch.tensor([position[c] for c in clients], dtype=torch.long)
            header = self._header(round=r, step=step, steps=steps, last=last, clients=clients)
            payloads[node] = _content(header, {k: v[rows] for k, v in shared.items()})
        if self.carrier is None:
            replies = self.cluster.send("train", payloads)
        else:  # the exchange's instances get ready; their masked inputs come back with the train replies
            asked = self._secure_ahead(active, r, step, payloads)
            replies = self.cluster.send("train", payloads)
            accepted: set[int] = set()
            held = self._held(active, groups, replies, accepted)
            answered = {node: reply for node, reply in replies.items() if node in accepted}
            self.carrier.absorb(self.carrier.answers(answered, asked, whole=False))
            return held
        parts: dict[int, Upload] = {}
        for node, reply in replies.items():
            try:
                parts[node] = self._upload(reply, groups[node])
            except (ValueError, TypeError) as err:  # ProtocolError is a ValueError
                self.cluster._reject(node, "train", str(err))
        rows = [(c, node) for c in active for node in [self.cluster.node_of[c]] if node in parts]
        return _ordered(parts, rows, self.shapes)

    def _secure_plans(self, clients: list[int], r: int, step: int) -> tuple[dict, dict]:
        """The secure instances of an exchange of ``clients`` as the aggregator will plan them
        (``{"parameter.group": plan}``), with their servers."""
        from pfpl.secure.protocol import SecAggServer

        aggregator = self.server.aggregator
        drops = self.server.dropouts(clients, r, step)
        groups = [int(self.server.groups[c]) for c in clients]
        plans, servers = {}, {}
        for index, name in enumerate(self.method.shared_params):
            length = aggregator.vector_length(math.prod(self.shapes[name]))
            for g, plan in aggregator.plan_ahead(clients, groups, drops, r, step, index).items():
                key = f"{index}.{g}"
                plans[key] = plan
                servers[key] = SecAggServer(
                    plan.everyone, plan.graph, plan.threshold, length, aggregator.settings.ring_bits
                )
        return plans, servers

    def _next_exchange(self, active: list[int], r: int, step: int) -> tuple[int, int, list[int]] | None:
        """(round, step, participants) of the exchange after this one, if the run has one."""
        starts = [first for first, _, _ in self.rounds.exchanges()]
        later = [s for s in starts if s > step]
        if later:
            return r, later[0], active
        if r + 1 >= self.cfg.federation.rounds:
            return None
        return r + 1, starts[0], [int(c) for c in self.server.participants(r + 1).tolist()]

    def _secure_ahead(self, active: list[int], r: int, step: int, payloads: dict) -> dict:
        """Make this exchange's secure instances ready (set up ahead on the last exchange's round
        trips, or now in two of their own), set up the next exchange's, and put this one's masked
        input requests and the next one's key messages on the train messages. Returns what was asked."""
        carrier = self.carrier
        plans, servers = self._secure_plans(active, r, step)
        ahead = carrier.planned((r, step), plans)
        if not ahead:  # the first exchange, or its plan changed (new groups)
            carrier.prepare((r, step), plans, servers)
        carrier.discard(before=(r, step))
        carrier.ready((r, step))
        if ahead and not carrier.intact((r, step)):  # it lost clients on the way: set up afresh, now
            carrier.prepare((r, step), *self._secure_plans(active, r, step))
            carrier.ready((r, step))
        following = self._next_exchange(active, r, step)
        if following is not None and following[2]:
            carrier.prepare(following[:2], *self._secure_plans(following[2], *following[:2]))
        return carrier.attach(payloads, (r, step))

    def ask(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]:
        """A server phase's question (:meth:`~pfpl.federation.rounds.Transport.ask`): one ``query.phase``
        message per node with its clients' requests; the replies of the clients that answered (a
        node's malformed reply is rejected whole, an answer for a client not asked is ignored)."""
        groups = self.cluster.by_node(sorted(int(c) for c in requests))
        payloads = {}
        for node, clients in groups.items():
            content = _content(self._header(round=self.server.round, kind=kind, clients=clients))
            for c in clients:
                R.put_fields(content, f"{PHASE}/{c}", requests[c])
            payloads[node] = content
        replies: dict[int, dict] = {}
        for node, reply in self.cluster.send("query.phase", payloads).items():
            try:
                R.header(reply, {"clients"})
                answers = R.take_fields(reply, PHASE)
                if not set(answers) <= set(groups[node]):
                    raise ProtocolError(f"answers for clients {sorted(answers)}, asked {groups[node]}")
            except ProtocolError as err:
                self.cluster._reject(node, f"query.phase ({kind})", str(err))
                continue
            replies.update(answers)
        return replies

    def _held(self, active: list[int], groups: dict, replies: dict, accepted: set[int]) -> Upload:
        """Under secure aggregation the nodes keep their uploads: which clients hold one (values unseen);
        ``accepted`` gets the nodes whose reply passed (their masked inputs count)."""
        delivered = set()
        for node, reply in replies.items():
            try:
                only_records(reply, {R.PFPL}, prefix="secagg/")  # the values stay on the node until masked
                got = R.int_list(R.header(reply, {"clients"}), "clients")
                if got != groups[node]:
                    raise ProtocolError(f"answered for clients {got}, asked {groups[node]}")
                delivered.update(got)
                accepted.add(node)
            except ProtocolError as err:
                self.cluster._reject(node, "train", str(err))
        clients = [c for c in active if c in delivered]
        sizes = torch.tensor([float(self.sizes[c]) for c in clients])
        unseen = {k: torch.zeros(len(clients), *s) for k, s in self.shapes.items()}  # the server never sees values
        return Upload(torch.tensor(clients, dtype=torch.long), unseen, sizes, torch.full((len(clients),), math.nan))

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
        """One round of the shared round loop (:class:`~pfpl.federation.rounds.Rounds`) over messages."""
        start = time.perf_counter()
        info = self.rounds.run_round(self)
        self.train_seconds += time.perf_counter() - start
        return info

    def evaluate(self) -> dict:
        product = None
        if self.fedsp is not None:  # the server's full model with the prompt: the same for every client
            params = {"prompt": self.server.shared["prompt"][:1]}
            product = {"text": self.method.release_features(None, params, None)[0].detach().cpu()}
        payloads = {}
        for node, clients in self.cluster.hosted.items():
            ids = torch.tensor(clients, dtype=torch.long)
            payloads[node] = _content(self._header(round=self.server.round), self.server.broadcast(ids))
            if product is not None:
                payloads[node].array_records["product"] = R.to_arrays(product)
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
        own = {k.removeprefix("aux/"): v for k, v in per_client.items() if k.startswith("aux/")}
        if own:
            self.auxiliary = summarize(own)
        return summarize({k: v for k, v in per_client.items() if not k.startswith("aux/")})

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
        return privacy_record(self.plan, self.epsilons, self.client_level)

    def state_dict(self) -> dict:
        """What a resumed server needs: its own state (its own secret among it, never a client's: those
        stay on the nodes), the ε it last heard, and the secure instances it skipped."""
        return {
            "server": self.server.state_dict(),
            "client_level": self.client_level.state_dict(),
            "epsilons": list(self.epsilons),
            "run_id": self.run_id,
            "secure_failures": list(getattr(self.server.aggregator, "failures", [])),
            "phases": [list(getattr(p, "log", [])) for p in self.phases],
        }

    def load_state_dict(self, state: dict) -> None:
        for phase, entries in zip(self.phases, state.get("phases", [])):
            if hasattr(phase, "log"):
                phase.log[:] = entries
        self.server.load_state_dict(state["server"])
        self.rounds.client_level = Accountant.from_state(state["client_level"])
        self.epsilons = list(state["epsilons"])
        self.run_id = str(state["run_id"])
        if hasattr(self.server.aggregator, "failures"):
            self.server.aggregator.failures[:] = state.get("secure_failures", [])

    def finish(self, folder: RunFolder) -> dict:
        failures = getattr(self.server.aggregator, "failures", None)
        extra = {}
        if self.fedsp is not None:  # the clients' own products (scored on their nodes), the model owner's figures
            extra = fedsp_record(self.auxiliary or {}, self.fedsp, self.method, self.server.shared["prompt"][0].numel())
        return {
            **extra,
            **grouping(self, self.bench),
            **({} if failures is None else {"secure_failures": len(failures)}),
            "privacy": self.plan.describe(),
            "flower": {
                "supernodes": len(self.cluster.hosted),
                "rejected_replies": len(self.cluster.rejected),
                "train_s": round(self.train_seconds, 3),  # this server process's rounds (not before a resume)
                "secure_aggregation_s": round(self.secure_seconds, 3),
                # secure-aggregation round trips of their own (masked inputs ride on the train messages)
                "secure_round_trips": self.carrier.round_trips if self.carrier is not None else 0,
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
