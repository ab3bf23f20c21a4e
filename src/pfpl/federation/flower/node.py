"""A SuperNode's side of pfpl: for the clients it hosts, the same :class:`ClientUpdate`, sample-level
mechanism and per-client accountants as the simulator.

A node with ``partition-id`` p of ``num-partitions`` P hosts the benchmark's clients c with
c mod P = p. On the shapes world every node regenerates the benchmark from the run's config (it is
deterministic) and keeps only its own clients' records and test sets; its image features are
cached in its own cache folder. Each client's local parameters, optimizer rows, accountant and
participation count are the node's state: Flower keeps it in ``context.state`` between messages
(each message runs in a fresh process), and the node also writes it to its state folder at the end
of every round, so a restarted server can resume the federation where its checkpoint left it.

A message names the round and step it belongs to; a node whose state is elsewhere answers with an
error rather than train on the wrong state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from pfpl.algorithms import AUXILIARY_METHODS, get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.config import Config
from pfpl.errors import PfplError, ProtocolError
from pfpl.evaluation.federated import client_scores
from pfpl.federation.client import ClientState, ClientUpdate, steps_per_round
from pfpl.federation.flower import records as R
from pfpl.federation.runner import Benchmark, method_settings, train_settings
from pfpl.privacy.accounting import Accountant
from pfpl.streams import Purpose, client_streams, stream

log = logging.getLogger(__name__)


def flower_refusal(name: str) -> str | None:
    """Why method ``name`` cannot run on Flower yet (None: it can)."""
    if name in AUXILIARY_METHODS:
        return f"{name} distributes a distilled auxiliary model, which pfpl does not carry over Flower yet"
    if get_method(name)(MethodSettings()).server_phases():
        return f"{name} runs a server phase with the clients between rounds (SecPC), not carried over Flower yet"
    return None


def hosted_clients(n_clients: int, partition_id: int, num_partitions: int) -> list[int]:
    """The clients a node hosts: c mod P = p."""
    if not 0 <= partition_id < num_partitions:
        raise ProtocolError(f"partition-id {partition_id} is not in 0 … {num_partitions - 1}")
    return [c for c in range(n_clients) if c % num_partitions == partition_id]


@dataclass
class MethodState:
    """One method's state for the node's clients (rows in the order of ``Node.clients``)."""

    run: str
    done: int  # rounds completed (and evaluated)
    next_step: int  # the next exchange of the current round
    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    ledgers: list[Accountant]
    participations: list[int]

    def _meta(self) -> dict:
        """Everything but the tensors, as plain values (a ConfigRecord or a weights-only file holds it)."""
        return {
            "run": self.run,
            "done": self.done,
            "next_step": self.next_step,
            "participations": list(self.participations),
            "ledgers": json.dumps([x.state_dict() for x in self.ledgers]),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**self.params, **{f"momentum/{k}": v for k, v in self.momentum.items()}}

    @classmethod
    def _from(cls, meta, tensors: dict[str, torch.Tensor]) -> MethodState:
        return cls(
            str(meta["run"]),
            int(meta["done"]),
            int(meta["next_step"]),
            {k: v for k, v in tensors.items() if not k.startswith("momentum/")},
            {k.removeprefix("momentum/"): v for k, v in tensors.items() if k.startswith("momentum/")},
            [Accountant.from_state(x) for x in json.loads(str(meta["ledgers"]))],
            [int(x) for x in meta["participations"]],
        )

    def to_records(self, state: RecordDict, name: str) -> None:
        state.array_records[f"{name}/params"] = R.to_arrays(self._tensors())
        state.config_records[f"{name}/meta"] = ConfigRecord(self._meta())

    @classmethod
    def from_records(cls, state: RecordDict, name: str) -> MethodState | None:
        if f"{name}/meta" not in state.config_records:
            return None
        return cls._from(state.config_records[f"{name}/meta"], R.from_arrays(state.array_records[f"{name}/params"]))

    def to_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": self._meta(), "tensors": self._tensors()}, tmp)
        tmp.replace(path)

    @classmethod
    def from_file(cls, path: Path) -> MethodState | None:
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True)
        return cls._from(saved["meta"], saved["tensors"])


class Node:
    """The clients one SuperNode hosts, and what it does for them."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int, state_dir: Path):
        self.cfg, self.partition_id = cfg, partition_id
        self.bench = Benchmark(cfg)
        self.settings = train_settings(cfg)
        self.clients = hosted_clients(cfg.federation.n_clients, partition_id, num_partitions)
        self.data = self.bench.client_data()
        self.sizes = torch.tensor(self.data.sizes(), dtype=torch.float32)
        self.state_dir = Path(state_dir)
        self._methods: dict[str, tuple] = {}

    def hello(self) -> dict:
        return {
            "partition_id": self.partition_id,
            "clients": self.clients,
            "sizes": [int(self.sizes[c]) for c in self.clients],
            "backbone": self.bench.backbone.fingerprint,
            "dataset": self.bench.dataset.fingerprint,
        }

    # ---- one method ------------------------------------------------------------------------------
    def method(self, name: str):
        """(method, privacy plan, client update, local steps per round) of ``name``."""
        if name not in self._methods:
            why = flower_refusal(name)
            if why:
                raise ProtocolError(why)
            method = get_method(name)(method_settings(self.cfg, self.bench.backbone))
            plan = self.bench.privacy_plan(name)
            update = ClientUpdate(
                method,
                self.bench.tower,
                self.settings,
                self.bench.backbone.logit_scale,
                self.bench.reference,
                plan.gradient_mechanism(),
            )
            steps = steps_per_round(self.data.sizes(), self.settings) * len(method.stages())
            self._methods[name] = (method, plan, update, steps)
        return self._methods[name]

    def _fresh(self, name: str, run: str) -> MethodState:
        method = self.method(name)[0]
        tower, seed = self.bench.tower, self.settings.seed
        held = self.data.held_classes(tower.num_classes)
        rows = [
            method.init_local(tower.n_ctx, tower.backbone.ctx_dim, stream(seed, Purpose.INIT_LOCAL, client=c), held[c])
            for c in self.clients
        ]
        params = {k: torch.stack([r[k] for r in rows]) for k in method.local_params}
        kind = self.method(name)[1].accountant
        return MethodState(run, 0, 0, params, {}, [Accountant(kind) for _ in self.clients], [0] * len(self.clients))

    def _snapshot(self, name: str, run: str, done: int) -> Path:
        return self.state_dir / run / f"node-{self.partition_id}-{name}-round{done}.pt"

    def _save_snapshot(self, name: str, current: MethodState) -> None:
        """The end of round ``done``; the one before it stays (a server may resume from either)."""
        current.to_file(self._snapshot(name, current.run, current.done))
        self._snapshot(name, current.run, current.done - 2).unlink(missing_ok=True)

    def load(self, name: str, run: str, done: int, step: int | None, state: RecordDict) -> MethodState:
        """The method's state after ``done`` completed rounds (and, unless None, before exchange ``step``
        of the next): from ``context.state``, else from the end-of-round snapshot (a resumed server),
        else fresh at the start of the run; anything else is an error naming both positions."""

        def fits(s: MethodState | None) -> bool:
            return s is not None and s.run == run and s.done == done and (step is None or s.next_step == step)

        current = MethodState.from_records(state, name)
        if not fits(current):
            saved = MethodState.from_file(self._snapshot(name, run, done))
            if fits(saved):
                current = saved
            elif done == 0 and step in (0, None) and (current is None or current.run != run):
                current = self._fresh(name, run)
        if not fits(current):
            where = (
                "no state for it"
                if current is None
                else f"its state after round {current.done}, step {current.next_step}"
            )
            raise ProtocolError(
                f"node {self.partition_id}: asked for {name} after round {done}"
                + ("" if step is None else f", step {step}")
                + f", but it holds {where}"
            )
        return current

    def _rows(self, clients: list[int]) -> list[int]:
        position = {c: i for i, c in enumerate(self.clients)}
        unknown = [c for c in clients if c not in position]
        if unknown:
            raise ProtocolError(f"node {self.partition_id} does not host client(s) {unknown}")
        return [position[c] for c in clients]

    def _shared(self, name: str, content: RecordDict, clients: list[int]) -> dict[str, torch.Tensor]:
        method = self.method(name)[0]
        tower = self.bench.tower
        templates = method.init_shared(tower.n_ctx, tower.backbone.ctx_dim, torch.Generator().manual_seed(0))
        expected = {k: (len(clients), *v.shape) for k, v in templates.items()}
        if R.SHARED not in content.array_records:
            if expected:
                raise ProtocolError("the message carries no shared parameters")
            return {}
        return R.check_tensors(R.from_arrays(content.array_records[R.SHARED]), expected, "shared parameters")

    # ---- messages --------------------------------------------------------------------------------
    def train(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """One exchange: the named clients take ``steps`` local steps from step ``step`` of the round."""
        head = R.header(content)
        name, run = str(head["method"]), str(head["run"])
        r, step, steps, last = int(head["round"]), int(head["step"]), int(head["steps"]), bool(head["last"])
        clients = R.int_list(head, "clients")
        method, plan, update, per_round = self.method(name)
        current = self.load(name, run, r, step, state)
        rows = self._rows(clients)
        shared = self._shared(name, content, clients)
        ids = torch.tensor(clients, dtype=torch.long)
        sub = ClientState(
            ids,
            {k: v[rows].clone() for k, v in current.params.items()},
            {k: v[rows].clone() for k, v in current.momentum.items()},
        )
        s = self.settings
        batches = self.data.batches(ids, per_round, s.batch_size, s.sampling, s.seed, r, range(step, step + steps))
        upload = update(shared, sub, batches, self.sizes[ids], r, step)
        for k, v in sub.params.items():
            current.params[k][rows] = v
        for k, v in sub.momentum.items():
            if k not in current.momentum:
                current.momentum[k] = torch.zeros(len(self.clients), *v.shape[1:], dtype=v.dtype)
            current.momentum[k][rows] = v
        current.next_step = step + steps
        if last:
            for row in rows:
                plan.charge_round(current.ledgers[row], int(self.sizes[self.clients[row]]), per_round)
                current.participations[row] += 1
        current.to_records(state, name)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, "clients": clients})
        if self.cfg.federation.secure_aggregation:  # the values stay here until the protocol masks them
            state.array_records[f"{name}/pending-values"] = R.to_arrays(upload.values)
            state.config_records[f"{name}/pending-meta"] = ConfigRecord({"clients": clients, "round": r, "step": step})
            return reply
        reply.array_records[R.VALUES] = R.to_arrays(upload.values)
        reply.array_records[R.STATS] = R.to_arrays({"sizes": upload.sizes, "loss": upload.loss.detach()})
        return reply

    def secure_aggregation(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """One phase of the secure-aggregation instances of the last exchange, for every hosted client
        the server addressed: ``advertise`` encodes the client's pending upload (its own clipping,
        weighting, fixed point and distributed noise) and starts its protocol state; ``share``,
        ``masked`` and ``unmask`` continue it. A client whose step fails is left out of the reply (the
        server treats it as dropped)."""
        from pfpl.federation.runner import build_aggregator
        from pfpl.secure import wire
        from pfpl.secure.protocol import PHASES, SecAggClient

        head = R.header(content)
        name, phase = str(head["method"]), str(head["phase"])
        if phase not in PHASES:
            raise ProtocolError(f"unknown secure-aggregation phase {phase!r}")
        method, plan, _, _ = self.method(name)
        aggregator = build_aggregator(self.cfg, plan)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, "phase": phase})
        steps = {"share": SecAggClient.share_keys, "masked": SecAggClient.masked_input, "unmask": SecAggClient.unmask}
        if phase == "advertise":  # a new exchange: what earlier instances left behind goes
            for key in [k for k in state.config_records if k.startswith("secagg/")]:
                del state.config_records[key]
        for key, record in content.config_records.items():
            if not key.startswith("secagg/"):
                continue
            instance, client = key.removeprefix("secagg/").rsplit("/", 1)
            fields = dict(record)
            try:
                if phase == "advertise":
                    message = wire.from_fields({k: v for k, v in fields.items() if k != "summands"})
                    pending = state.config_records.get(f"{name}/pending-meta")
                    if (
                        pending is None
                        or int(pending["round"]) != int(head["round"])
                        or int(pending["step"]) != int(head["step"])
                    ):
                        raise ProtocolError("no upload of this exchange is waiting for secure aggregation")
                    index = int(instance.split(".")[0])
                    values = R.from_arrays(state.array_records[f"{name}/pending-values"])[method.shared_params[index]]
                    row = [int(c) for c in pending["clients"]].index(int(client))
                    vector = aggregator.encode(
                        values[row].numpy(),
                        float(self.sizes[int(client)]),
                        int(client),
                        int(fields["summands"]),
                        message.threshold,
                        int(head["round"]),
                        int(head["step"]),
                        index,
                    )
                    holder = SecAggClient(int(client), vector)
                    answer = holder.setup(message)
                else:
                    holder = wire.client_from_state(dict(state.config_records[f"secagg/{instance}/{client}"]))
                    answer = steps[phase](holder, wire.from_fields(fields))
            except (PfplError, KeyError, ValueError) as err:
                log.warning("pfpl node: client %s left secure aggregation %s at %s: %s", client, instance, phase, err)
                continue
            if phase == "unmask":
                del state.config_records[f"secagg/{instance}/{client}"]
            else:
                state.config_records[f"secagg/{instance}/{client}"] = ConfigRecord(wire.client_state(holder))
            reply.config_records[key] = ConfigRecord(wire.to_fields(answer))
        return reply

    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Every hosted client's scores with the prompt it holds after round ``round``, and its ε; the
        round is then complete on this node (its state is written to the state folder)."""
        head = R.header(content)
        name, run, r = str(head["method"]), str(head["run"]), int(head["round"])
        method, plan, _, _ = self.method(name)
        try:
            current = self.load(name, run, r - 1, None, state)
        except ProtocolError:  # already evaluated: a repeated request (a resumed server) gets the same answer
            current = self.load(name, run, r, 0, state)
        shared = self._shared(name, content, self.clients)
        ids = torch.tensor(self.clients, dtype=torch.long)
        with torch.no_grad():
            params = {**shared, **current.params}
            gens = client_streams(self.settings.seed, Purpose.RELEASE, ids)
            text = method.release_features(self.bench.tower, params, gens)
        scores = client_scores(text, self.clients, self.bench.test, self.bench.plan)
        eps = [plan.client_epsilon(led, n) for led, n in zip(current.ledgers, current.participations)]
        current.done, current.next_step = r, 0
        current.to_records(state, name)
        self._save_snapshot(name, current)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord(
            {
                "version": R.PROTOCOL_VERSION,
                "clients": self.clients,
                "epsilon": [float(e) for e in eps],
                **{f"score/{k}": [float(x) for x in v] for k, v in scores.items()},
            }
        )
        return reply
