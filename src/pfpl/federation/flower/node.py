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

A message may name an exchange the node has already trained (a server resumed from an earlier
checkpoint, or one replaying messages): the node then trains it again from its snapshot — the same
batches, noise and distributed-DP shares (they are keyed by round, step and client), so the same
upload — but it never releases a second, different thing for one exchange. The node's release
ledger (``{method}/masked`` and ``{method}/released`` in ``context.state``, a ledger file in its
state folder, and a copy in every end-of-round snapshot; merged, never overwritten, whenever state
is restored) records every (run, round, step, shared parameter, client) whose upload was encoded
into a secure-aggregation instance, and the digest of every upload a private run sent in the clear:

* under secure aggregation each client's upload of one exchange is masked into one instance, ever;
  a later advertise for it (a replayed ``train``, a rewound node, a restarted node) is refused, so a
  server cannot unmask two sums of one exchange that differ by one client's vector;
* in a private run without secure aggregation a repeated exchange is answered only if every
  client's upload is bit-identical to the one already sent (it then tells the server nothing new);
  a different one — other shared parameters, the same noise — is refused.

So a server killed mid-round after its clients masked an exchange resumes, from its end-of-round
checkpoint, with those clients dropped from the re-run exchange (its instance is skipped below the
threshold, as for any dropout), and continues normally from the next exchange.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from pfpl.algorithms import get_method, spec
from pfpl.algorithms.base import MethodSettings
from pfpl.config import Config
from pfpl.errors import PfplError, ProtocolError
from pfpl.evaluation.federated import client_scores
from pfpl.federation.client import ClientUpdate
from pfpl.federation.context import Benchmark
from pfpl.federation.flower import records as R
from pfpl.federation.host import ClientHost
from pfpl.federation.wiring import method_settings, plan_for, train_settings
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.modes import is_private, secret_randomness
from pfpl.streams import Streams

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a run id names a folder of the node's state: nothing else


def flower_refusal(name: str) -> str | None:
    """Why method ``name`` cannot run on Flower yet (None: it can)."""
    method = get_method(name)(MethodSettings())
    if method.server_phases() and not method.client_handlers():
        return f"{name} runs a server phase with the clients between rounds that has no client side over messages"
    return None


def model_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for key in sorted(weights):
        value = weights[key].detach().cpu().contiguous()
        h.update(key.encode() + b"\0" + str(value.dtype).encode() + repr(tuple(value.shape)).encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


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
    # the hosted clients' mechanism streams: their secrets never leave this node (secret material on
    # disk too: the node's snapshot lets a resumed node continue its streams)
    streams: Streams
    # the node's release ledger at the snapshot (file only: in context.state it has its own records)
    ledger: Ledger = field(default_factory=lambda: Ledger())

    def host_state(self, clients: list[int]) -> dict:
        """This state as the node's :class:`~pfpl.federation.host.ClientHost` holds it."""
        return {
            "clients": list(clients),
            "streams": self.streams.state_dict(),
            "local": self.params,
            "momentum": self.momentum,
            "participations": torch.tensor(self.participations, dtype=torch.long),
            "ledgers": [x.state_dict() for x in self.ledgers],
        }

    def absorb(self, host: dict) -> None:
        """Take the host's state after it trained."""
        self.params = {k: v.clone() for k, v in host["local"].items()}
        self.momentum = {k: v.clone() for k, v in host["momentum"].items()}
        self.participations = [int(x) for x in host["participations"].tolist()]
        self.ledgers = [Accountant.from_state(x) for x in host["ledgers"]]

    @classmethod
    def of_host(cls, run: str, host: dict) -> MethodState:
        """A fresh method state from a fresh host."""
        state = cls(run, 0, 0, {}, {}, [], [], Streams(int(host["streams"]["seed"]), host["streams"]["secrets"]))
        state.absorb(host)
        return state

    def _meta(self) -> dict:
        """Everything but the tensors, as plain values (a ConfigRecord or a weights-only file holds it)."""
        secrets = self.streams.secrets
        return {
            "run": self.run,
            "done": self.done,
            "next_step": self.next_step,
            "participations": list(self.participations),
            "ledgers": json.dumps([x.state_dict() for x in self.ledgers]),
            "seed": self.streams.seed,
            "secret_ids": [] if secrets is None else list(secrets),
            "secrets": [] if secrets is None else list(secrets.values()),
            "randomness": self.streams.mode,
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
            Streams(
                int(meta["seed"]),
                None
                if str(meta["randomness"]) == "seeded"
                else {int(c): bytes(v) for c, v in zip(meta["secret_ids"], meta["secrets"])},
            ),
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
        torch.save({"meta": self._meta(), "tensors": self._tensors(), "ledger": self.ledger.plain()}, tmp)
        tmp.replace(path)

    @classmethod
    def from_file(cls, path: Path) -> MethodState | None:
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True)
        out = cls._from(saved["meta"], saved["tensors"])
        out.ledger = Ledger.from_plain(saved.get("ledger"))
        return out


@dataclass
class Ledger:
    """What a node has released of one method's exchanges: ``masked`` — the uploads encoded into a
    secure-aggregation instance (``run/round/step/index/client``, every local step an upload covers)
    and the share and unmask answers given (``run/answered/{round id}/{phase}/client``); ``released``
    — the digest of each upload sent in the clear in a private run (``run/round/step/client`` ->
    sha256). Only ever grows:
    restored copies are merged into it (:meth:`merge`), never put in its place."""

    masked: set[str] = field(default_factory=set)
    released: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Ledger) -> bool:
        """Take in ``other``'s entries (a digest already held stays); True if anything was new."""
        new = bool(other.masked - self.masked) or any(k not in self.released for k in other.released)
        self.masked |= other.masked
        for key, digest in other.released.items():
            self.released.setdefault(key, digest)
        return new

    def of_run(self, run: str) -> Ledger:
        prefix = f"{run}/"
        return Ledger(
            {k for k in self.masked if k.startswith(prefix)},
            {k: v for k, v in self.released.items() if k.startswith(prefix)},
        )

    def plain(self) -> dict:
        return {"masked": sorted(self.masked), "released": dict(sorted(self.released.items()))}

    @classmethod
    def from_plain(cls, plain) -> Ledger:
        """A saved ledger; an unreadable one is a ProtocolError (the node then refuses: it cannot tell
        what it already released)."""
        if plain is None:
            return cls()
        try:
            masked, released = plain["masked"], plain["released"]
            if not all(isinstance(k, str) for k in masked):
                raise TypeError("a masked entry is not a string")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in released.items()):
                raise TypeError("a released entry is not a string")
            return cls(set(masked), dict(released))
        except (KeyError, TypeError, AttributeError) as err:
            raise ProtocolError(f"the node's release ledger is unreadable: {err}") from None

    def to_records(self, state: RecordDict, name: str) -> None:
        state.config_records[f"{name}/masked"] = ConfigRecord({k: True for k in sorted(self.masked)})
        state.config_records[f"{name}/released"] = ConfigRecord(dict(sorted(self.released.items())))

    @classmethod
    def from_records(cls, state: RecordDict, name: str) -> Ledger:
        masked = state.config_records.get(f"{name}/masked")
        released = state.config_records.get(f"{name}/released")
        return cls(set(masked or {}), {k: str(v) for k, v in (released or {}).items()})


def _digest(upload, row: int) -> str:
    """A client's upload (its row of every shared tensor, and its record count), as sha256."""
    h = hashlib.sha256()
    for key in sorted(upload.values):
        value = upload.values[key][row].detach().cpu().contiguous()
        h.update(key.encode() + b"\0" + str(value.dtype).encode() + repr(tuple(value.shape)).encode())
        h.update(value.numpy().tobytes())
    h.update(repr(float(upload.sizes[row])).encode())
    return h.hexdigest()


class Node:
    """The clients one SuperNode hosts, and what it does for them."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int, state_dir: Path):
        self.cfg, self.partition_id = cfg, partition_id
        self.bench = Benchmark(cfg)
        self.settings = train_settings(cfg)
        self.clients = hosted_clients(cfg.federation.n_clients, partition_id, num_partitions)
        self.sizes = torch.tensor(self.bench.partition.sizes(), dtype=torch.float32)
        self.state_dir = Path(state_dir)
        self._methods: dict[str, tuple] = {}
        self._auxiliary: dict[str, tuple] = {}  # method -> (digest, its tower, its clients' data, body)
        self._phase_state: dict[tuple[str, str], dict] = {}  # (method, run) -> its server phases' client side

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
        """(method, privacy plan, the hosted clients' host) of ``name``: the simulator's
        :class:`~pfpl.federation.host.ClientHost` for this node's clients, whose state each message
        loads from and writes back to the node's context."""
        if name not in self._methods:
            why = flower_refusal(name)
            if why:
                raise ProtocolError(why)
            settings = method_settings(self.cfg, self.bench.backbone)
            if spec(name).auxiliary:  # FedSP: the model the server shipped, its body the clients' start
                tower, data, body = self._auxiliary_model(name)
                settings.extra.update({"fedsp_body": body, "fedsp_upload": self.cfg.fedsp.upload})
            else:  # the simulator's data for the method (FedOTP's patch features, vision prompts' tokens)
                tower, data = self.bench.tower, self.bench.method_data(name)
            method = get_method(name)(settings)
            cfg = self.cfg if spec(name).auxiliary else self.bench.method_config(name)  # its measured clip
            plan = plan_for(cfg, method, self.bench.partition.sizes(), self.settings, tower.backbone.ctx_dim)
            update = ClientUpdate(
                method, tower, self.settings, self.bench.backbone.logit_scale, self.bench.reference,
                plan.gradient_mechanism(),
            )  # fmt: skip
            host = self._host(method, tower, data, update, plan, Streams(self.settings.seed))
            self._methods[name] = (method, plan, host)
        return self._methods[name]

    def _host(self, method, tower, data, update, plan, streams: Streams) -> ClientHost:
        return ClientHost(method, tower, data, self.settings, update, self.clients, streams, plan)

    def _fresh(self, name: str, run: str) -> MethodState:
        """The method's state at the start of a run: a fresh host's (initial local parameters, new
        accountants, new secrets for the hosted clients in a private run)."""
        method, plan, host = self.method(name)
        streams = Streams.create(self.settings.seed, self.clients, secret_randomness(self.cfg.dp))
        fresh = self._host(method, host.tower, host.data, host.update, plan, streams)
        return MethodState.of_host(run, fresh.state_dict())

    # ---- FedSP's auxiliary model -------------------------------------------------------------------
    def _auxiliary_file(self, name: str) -> Path:
        return self.state_dir / "auxiliary" / f"node-{self.partition_id}-{name}.safetensors"

    def receive_model(self, content: RecordDict) -> RecordDict:
        """The auxiliary model the server distilled for ``method`` (FedSP), shipped once per run: its
        weights must fit the auxiliary architecture of this config and match the digest the server
        names; it is kept in the node's state folder (a restarted worker reloads it)."""
        from safetensors.torch import save_file

        head = R.header(content, {"method", "digest"})
        name, digest = R.text(head, "method"), R.text(head, "digest")
        if not spec(name).auxiliary:
            raise ProtocolError(f"{name} trains no auxiliary model")
        if "weights" not in content.array_records:
            raise ProtocolError("the message carries no model weights")
        weights = R.from_arrays(content.array_records["weights"])
        if model_digest(weights) != digest:
            raise ProtocolError("the model's weights do not match the digest the server sent")
        self._load_auxiliary(name, weights, digest)  # checks the architecture before anything is kept
        path = self._auxiliary_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path.with_suffix(".tmp")), {"digest": digest})
        path.with_suffix(".tmp").replace(path)
        self._methods.pop(name, None)  # rebuilt on the new model
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, "digest": digest})
        return reply

    def _load_auxiliary(self, name: str, weights: dict[str, torch.Tensor], digest: str) -> tuple:
        from pfpl.backbones import OpenClipBackbone, PromptTower
        from pfpl.backbones.auxiliary import auxiliary_backbone, text_body
        from pfpl.data.clients import ClientData
        from pfpl.data.features import image_features

        f, cfg = self.cfg.fedsp, self.cfg
        aux = auxiliary_backbone(self.bench.backbone, f.auxiliary, f.layers)
        scalars = {k for k, v in aux.model.state_dict().items() if v.dim() == 0}
        weights = {k: v.reshape(()) if k in scalars and v.shape == (1,) else v for k, v in weights.items()}
        try:
            aux.model.load_state_dict(weights, strict=True)
        except (RuntimeError, KeyError) as err:
            raise ProtocolError(f"the auxiliary model does not fit {aux.name}: {str(err)[:300]}") from None
        aux.model.to(self.bench.device).eval()
        aux = OpenClipBackbone(aux.model, f"{aux.name}:{digest[:16]}", aux.preprocess, aux.tokenizer, str(aux.device))
        train = image_features(aux, self.bench.dataset, "train", cfg.cache_dir)
        tower = PromptTower(
            aux, self.bench.dataset.classnames, cfg.prompt.n_ctx,
            max_sequences=cfg.train.max_sequences, share_prefix=cfg.train.share_prefix,
        )  # fmt: skip
        test = image_features(aux, self.bench.dataset, "test", cfg.cache_dir).to(aux.device)
        out = (digest, tower, ClientData(train, self.bench.partition.clients, aux.device), text_body(aux), test)
        self._auxiliary[name] = out
        return out

    def _auxiliary_model(self, name: str) -> tuple:
        """(tower, clients' data, body) of the auxiliary model received for ``name``."""
        return self._auxiliary_received(name)[1:4]

    def _auxiliary_received(self, name: str) -> tuple:
        """(digest, tower, clients' data, body, test features) of the auxiliary model received for ``name``."""
        if name not in self._auxiliary:
            from safetensors import safe_open
            from safetensors.torch import load_file

            path = self._auxiliary_file(name)
            if not path.is_file():
                raise ProtocolError(f"{name}: no auxiliary model was received (the server ships it before round 1)")
            with safe_open(str(path), "pt") as handle:
                digest = (handle.metadata() or {}).get("digest", "")
            self._load_auxiliary(name, load_file(str(path)), digest)
        return self._auxiliary[name]

    def _snapshot(self, name: str, run: str, done: int) -> Path:
        return self.state_dir / run / f"node-{self.partition_id}-{name}-round{done}.pt"

    def _save_snapshot(self, name: str, current: MethodState, state: RecordDict) -> None:
        """The end of round ``done`` (with the release ledger); the one before it stays (a server may
        resume from either)."""
        current.ledger = self.ledger(name, current.run, state).of_run(current.run)
        current.to_file(self._snapshot(name, current.run, current.done))
        self._snapshot(name, current.run, current.done - 2).unlink(missing_ok=True)

    # ---- the release ledger ----------------------------------------------------------------------
    def _ledger_file(self, name: str, run: str) -> Path:
        return self.state_dir / run / f"node-{self.partition_id}-{name}-ledger.json"

    def ledger(self, name: str, run: str, state: RecordDict) -> Ledger:
        """Everything the node released of ``name``: context.state's ledger merged with its ledger file
        (a restarted node's context.state is empty; the file is not)."""
        out = Ledger.from_records(state, name)
        path = self._ledger_file(name, run)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                why = f"node {self.partition_id}: its release ledger {path} is unreadable: {err}"
                raise ProtocolError(why) from None
            out.merge(Ledger.from_plain(saved))
        return out

    def _keep_ledger(self, name: str, run: str, ledger: Ledger, state: RecordDict) -> None:
        """Write the ledger to context.state and (this run's entries) to the ledger file, before any
        reply that depends on it leaves the node."""
        path = self._ledger_file(name, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger.of_run(run).plain()))
        tmp.replace(path)
        ledger.to_records(state, name)

    def load(self, name: str, run: str, done: int, step: int | None, state: RecordDict) -> MethodState:
        """The method's state after ``done`` completed rounds (and, unless None, before exchange ``step``
        of the next): from ``context.state``, else from the end-of-round snapshot (a resumed server),
        else fresh at the start of the run; anything else is an error naming both positions."""

        def fits(s: MethodState | None) -> bool:
            return s is not None and s.run == run and s.done == done and (step is None or s.next_step == step)

        if not RUN_ID.fullmatch(run):
            raise ProtocolError(f"run id {run!r} is not 1 to 64 letters, digits, '-' or '_'")
        current = MethodState.from_records(state, name)
        if not fits(current):
            saved = MethodState.from_file(self._snapshot(name, run, done))
            if saved is not None:  # its ledger joins the node's (a restore never forgets a release)
                ledger = Ledger.from_records(state, name)
                if ledger.merge(saved.ledger):
                    ledger.to_records(state, name)
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
        method, plan, host = self.method(name)
        if step < 0 or steps < 1 or step + steps > host.steps_per_round:
            raise ProtocolError(
                f"steps {step}..{step + steps - 1} are not local steps of a round of {host.steps_per_round}"
            )
        current = self.load(name, run, r, step, state)
        self._rows(clients)
        shared = self._shared(name, content, clients)
        ids = torch.tensor(clients, dtype=torch.long)
        host.load_state_dict(current.host_state(self.clients))
        upload = host.exchange(shared, ids, r, step, steps)
        if last:
            host.finish_round(clients)
        secure = self.cfg.federation.secure_aggregation
        if not secure and is_private(self.cfg.dp):  # what goes out in the clear: once per exchange
            ledger = self.ledger(name, run, state)
            digests = {c: _digest(upload, i) for i, c in enumerate(clients)}
            positions = {c: f"{run}/{r}/{step}/{c}" for c in clients}
            differ = [c for c in clients if ledger.released.get(positions[c], digests[c]) != digests[c]]
            if differ:
                raise ProtocolError(
                    f"client(s) {differ} already sent their upload of round {r}, step {step}: a different one "
                    "for the same exchange (with the same noise) is not sent"
                )
            if any(positions[c] not in ledger.released for c in clients):
                for c in clients:
                    ledger.released.setdefault(positions[c], digests[c])
                self._keep_ledger(name, run, ledger, state)
        current.absorb(host.state_dict())
        current.next_step = step + steps
        current.to_records(state, name)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, "clients": clients})
        if secure:  # the values stay here until the protocol masks them (once: the node's ledger)
            state.array_records[f"{name}/pending-values"] = R.to_arrays(upload.values)
            state.config_records[f"{name}/pending-meta"] = ConfigRecord(
                {"run": run, "clients": clients, "round": r, "step": step, "steps": steps}
            )
            self._forget_instances(state, run, (r, step))
            # the masked inputs of this exchange, and the key rounds of the next one's instances
            self._secure_entries(name, run, content, state, reply)
            return reply
        reply.array_records[R.VALUES] = R.to_arrays(upload.values)
        stats = {"sizes": upload.sizes}  # public (each client's record count)
        if not is_private(self.cfg.dp):  # the un-noised loss is no mechanism output: it stays here
            stats["loss"] = upload.loss.detach()
        reply.array_records[R.STATS] = R.to_arrays(stats)
        return reply

    def secure_aggregation(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Secure-aggregation messages alone (``train.secagg``): the key rounds of instances set up
        ahead of their exchange, a fresh instance's phases, the unmasking (:meth:`_secure_entries`)."""
        head = R.header(content)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION})
        self._secure_entries(str(head["method"]), str(head["run"]), content, state, reply)
        return reply

    def _secure_entries(self, name: str, run: str, content: RecordDict, state: RecordDict, reply: RecordDict) -> None:
        """Every secure-aggregation entry of a message (``secagg/{phase}/{round}.{step}.{parameter}.
        {group}/{client}``), for the hosted clients it names: ``advertise`` starts a client's instance
        (before its exchange's upload exists: the instance is set up ahead); ``share`` continues it;
        ``masked`` encodes the client's pending upload of that exchange (its own clipping, weighting,
        fixed point and distributed noise) and masks it; ``unmask`` answers and ends it. A client whose
        step fails is left out of the reply (the server treats it as dropped).

        A client's upload of one (run, round, step, shared parameter) is encoded into one instance,
        ever: the first masked input naming it enters it in the node's release ledger (before
        encoding, so a failed attempt is not retried either), which a replayed ``train`` message, a
        fallback to an older snapshot or a restarted node never resets. A second instance asking for
        it — in the same message, in a later one, after the server re-sent the exchange's ``train`` —
        is refused and logged, the client left out of the reply: else a server could unmask two sums of
        one exchange that differ by exactly one client's vector (or average away its fresh noise
        shares). A server killed mid-round after masking therefore resumes with those clients dropped
        from the re-run exchange."""
        from pfpl.federation.wiring import build_aggregator
        from pfpl.secure import wire
        from pfpl.secure.protocol import SecAggClient, Setup

        entries = sorted(k for k in content.config_records if k.startswith("secagg/"))
        if not entries:
            return
        method, plan, _ = self.method(name)
        pending = state.config_records.get(f"{name}/pending-meta")
        ledger = self.ledger(name, run, state)
        masked_before = len(ledger.masked)
        aggregators: dict[int, object] = {}
        kept: dict[str, dict] = {}  # protocol states, written once the ledger is
        ended: set[str] = set()
        steps = {"share": SecAggClient.share_keys, "unmask": SecAggClient.unmask}
        for key in entries:
            fields = dict(content.config_records[key])
            try:
                phase, exchange, instance, client = R.secagg_entry(key)
                if client not in self.clients:
                    raise ProtocolError(f"node {self.partition_id} does not host client {client}")
                index = int(instance.split(".")[0])
                if index >= len(method.shared_params):
                    raise ProtocolError(f"{name} has no shared parameter {index}")
                own = f"secagg/{exchange[0]}.{exchange[1]}.{instance}/{client}"
                if own in ended:
                    raise ProtocolError("its instance ended earlier in this message")
                if phase == "advertise":  # (a server that sets an instance up again replaces it: no vector yet)
                    summands = fields.pop("summands", None)
                    if not isinstance(summands, int) or isinstance(summands, bool) or summands < 1:
                        raise ProtocolError(f"summands {summands!r} is not a positive integer")
                    holder = SecAggClient(client)
                    answer = holder.setup(wire.from_fields(fields, Setup))
                else:
                    record = kept.get(own) or dict(state.config_records[own])  # KeyError: no such instance
                    if record.pop("run") != run:
                        raise ProtocolError("an instance of another run")
                    summands = record.pop("summands")
                    holder = wire.client_from_state(record)
                    message = wire.from_fields(fields)
                    if phase == "masked":

                        def aggregator(r=exchange[0]):  # the hosted clients' own streams draw their noise shares
                            if r not in aggregators:
                                streams = self.load(name, run, r, None, state).streams
                                aggregators[r] = build_aggregator(self.cfg, plan, streams)
                            return aggregators[r]

                        vector = self._encode_pending(
                            name,
                            run,
                            method,
                            pending,
                            ledger,
                            aggregator,
                            exchange,
                            index,
                            client,
                            summands,
                            holder,
                            state,
                        )
                        answer = holder.masked_input(message, vector)
                    else:
                        # each phase once, also against a node handed a stale state: the ledger on disk
                        answered = f"{run}/answered/{holder.setup_msg.round_id.hex()}/{phase}/{client}"
                        if answered in ledger.masked:
                            raise ProtocolError(f"it answered {phase} of this instance already")
                        answer = steps[phase](holder, message)
                        ledger.masked.add(answered)
            except (PfplError, KeyError, ValueError, TypeError, AttributeError) as err:
                log.warning("pfpl node: left %s out of secure aggregation: %s", key, err)
                continue
            if phase == "unmask":
                ended.add(own)
                kept.pop(own, None)
                state.config_records.pop(own, None)
            else:
                kept[own] = {**wire.client_state(holder), "run": run, "summands": summands}
            reply.config_records[key] = ConfigRecord(wire.to_fields(answer))
        if len(ledger.masked) > masked_before:
            self._keep_ledger(name, run, ledger, state)  # no masked input leaves on a ledger it did not keep
        for own, record in kept.items():
            state.config_records[own] = ConfigRecord(record)

    def _encode_pending(
        self, name, run, method, pending, ledger, aggregator, exchange, index, client, summands, holder, state
    ):
        """A client's pending upload of ``exchange`` as its ring vector for one instance — once, ever."""
        if pending is None or (str(pending.get("run")), int(pending["round"]), int(pending["step"])) != (
            run,
            *exchange,
        ):
            raise ProtocolError("no upload of this exchange is waiting for secure aggregation")
        pending_clients = [int(c) for c in pending["clients"]]
        if client not in pending_clients:
            raise ProtocolError("it has no upload waiting in this exchange")
        # every local step the upload covers: a replay that splits the round's steps differently
        # (steps 0–1 masked as one exchange, then 0 and 1 apart) would give step 1's upload again
        covered = range(exchange[1], exchange[1] + int(pending["steps"]))
        uses = [f"{run}/{exchange[0]}/{s}/{index}/{client}" for s in covered]
        if any(use in ledger.masked for use in uses):
            raise ProtocolError(
                f"its upload of {method.shared_params[index]!r} in round {exchange[0]}, steps "
                f"{list(covered)} was already encoded for an instance: it is not masked a second time"
            )
        ledger.masked.update(uses)  # before encoding: a failed attempt is not retried either
        values = R.from_arrays(state.array_records[f"{name}/pending-values"])[method.shared_params[index]]
        return aggregator().encode(
            values[pending_clients.index(client)].numpy(),
            float(self.sizes[client]),
            client,
            summands,
            holder.setup_msg.threshold,
            exchange[0],
            exchange[1],
            index,
        )

    @staticmethod
    def _forget_instances(state: RecordDict, run: str, exchange: tuple[int, int]) -> None:
        """The protocol states of instances of another run or of exchanges before ``exchange``: gone
        (an exchange that trains again starts its instances afresh; its uploads stay in the ledger)."""
        for key in [k for k in state.config_records if k.startswith("secagg/")]:
            record = state.config_records[key]
            r, step = (int(x) for x in key.split("/")[1].split(".")[:2])
            if record.get("run") != run or (r, step) < exchange:
                del state.config_records[key]

    def phase(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """A server phase's question to some hosted clients (SecFPP's clustering), after round
        ``round``'s training: each answers from its own state through the method's client side. What
        that side keeps between the phase's requests (a clustering's key pairs and shares: secrets
        that are never written anywhere) lives in this process, for one run and kind; a worker that
        restarts mid-phase leaves its clients out of that phase (SecPC then goes on without them, or
        fails cleanly and the groups stay). A client whose request is refused is left out of the
        reply."""
        head = R.header(content, {"method", "run", "round", "kind", "clients"})
        name, run, r, kind = str(head["method"]), str(head["run"]), R.integer(head, "round"), R.text(head, "kind")
        clients = R.int_list(head, "clients")
        self._rows(clients)
        method, _, host = self.method(name)
        current = self.load(name, run, r, None, state)
        host.load_state_dict(current.host_state(self.clients))
        requests = R.take_fields(content, "phase")
        if set(requests) != set(clients):
            raise ProtocolError(f"requests for clients {sorted(requests)}, the header names {clients}")
        key = (name, run)
        if key not in self._phase_state:
            while len(self._phase_state) >= 4:
                self._phase_state.pop(next(iter(self._phase_state)))
            self._phase_state[key] = {}
        host.phase_state = self._phase_state[key]
        before = {k: v.clone() for k, v in host.params.items()}
        answers = host.answer(kind, requests)
        if any(not torch.equal(before[k], v) for k, v in host.params.items()):
            # the phase changed the clients' state (pFedMoAP's download of experts): keep it, as
            # the simulator's clients keep it, for the round's evaluation and the next round
            current.absorb(host.state_dict())
            current.to_records(state, name)
        reply = RecordDict()
        reply.config_records[R.PFPL] = ConfigRecord({"version": R.PROTOCOL_VERSION, "clients": sorted(answers)})
        for c, fields in answers.items():
            R.put_fields(reply, f"phase/{c}", fields)
        return reply

    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Every hosted client's scores with the prompt it holds after round ``round``, and its ε; the
        round is then complete on this node (its state is written to the state folder)."""
        head = R.header(content)
        name, run, r = str(head["method"]), str(head["run"]), int(head["round"])
        method, plan, host = self.method(name)
        try:
            current = self.load(name, run, r - 1, None, state)
        except ProtocolError:  # already evaluated: a repeated request (a resumed server) gets the same answer
            current = self.load(name, run, r, 0, state)
        shared = self._shared(name, content, self.clients)
        host.load_state_dict(current.host_state(self.clients))
        vision = None
        if spec(name).auxiliary:  # FedSP's product is the server's full model with the prompt: its features
            expected = (len(self.bench.dataset.classnames), int(self.bench.reference.shape[-1]))
            if "product" not in content.array_records:
                raise ProtocolError(f"{name}: the evaluation carries no product text features")
            text = R.check_tensors(R.from_arrays(content.array_records["product"]), {"text": expected}, "product")
            text = text["text"].to(self.bench.device).expand(len(self.clients), *expected)
        else:  # each hosted client's classifier and vision prompts, scored as the simulator scores them
            text, vision = host.release_features(shared), host.release_vision(shared)
        scores = self.bench.scores(text, self.clients, vision)
        if spec(name).auxiliary:  # and each client's own product: its auxiliary model, body and prompt
            own = method.auxiliary_features(host.tower, {**shared, **host.params})
            test = self._auxiliary_received(name)[4]
            scores.update({f"aux/{k}": v for k, v in client_scores(own, self.clients, test, self.bench.plan).items()})
        eps = host.epsilons()
        current.done, current.next_step = r, 0
        current.to_records(state, name)
        self._save_snapshot(name, current, state)
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
