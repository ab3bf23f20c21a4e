"""The clients' side of the server's secure-aggregation instances, carried over Flower round trips.

The server's own :class:`~pfpl.secure.aggregator.SecureAggregator` plans every instance of an
exchange (one per shared parameter and group) and decodes each sum exactly as in the simulator; the
nodes encode, mask and answer. What this module adds is *when* each message travels. An instance's
two key rounds (advertise keys, share keys) do not need the vector it sums, so the instances of the
next exchange are set up while this one runs: their key messages ride on this exchange's ``train``
and unmasking round trips, the next ``train`` message carries each client's routed shares and its
reply the masked inputs. A secure exchange then costs one round trip more than a plain one (the
unmasking), not four. Each instance is still its own SecAgg+ instance — fresh keys, seeds and round
id, each phase once and in order — only set up earlier; an instance set up for a plan the exchange
does not have (the groups changed, a new run) is dropped unused and a fresh one set up.

Simulated dropouts (``federation.dropout``) stop a client at its drawn phase, as in the simulator; a
node that does not answer drops its clients from that phase on, and an answer that is malformed,
unasked for or of the wrong type drops its client. An instance that cannot complete is skipped by the
aggregator (recorded, not applied) while the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict

from pfpl.errors import ProtocolError
from pfpl.federation.flower import records as R
from pfpl.messages import PHASES

log = logging.getLogger(__name__)

Exchange = tuple[int, int]  # (round, step)


@dataclass
class Instance:
    """One instance of an exchange, set up ahead: its server, its plan, and the messages of the phase
    it waits at (``phase``: the next to run; "masked" once its key rounds are done)."""

    server: object
    plan: object
    phase: str
    inbox: dict
    answers: list | None = None  # its masked inputs, once the exchange's train reply brought them
    failed: Exception | None = None
    sent: bool = False  # its phase's messages are on a round trip under way


def _same(a, b) -> bool:
    return (a.everyone, a.threshold, a.graph, a.drops) == (b.everyone, b.threshold, b.graph, b.drops)


@dataclass
class MessageCarrier:
    cluster: object  # the driver's Cluster: ``send``, ``node_of``, ``_reject``
    header: Callable[[int, int], dict]  # (round, step) -> a message header of that exchange
    seconds: float = 0.0  # time in secure-aggregation round trips of their own
    round_trips: int = 0  # how many (those riding on a train message not counted)
    ahead: dict[Exchange, dict[str, Instance]] = field(default_factory=dict)

    # ---- instances set up ahead of their exchange ---------------------------------------------------
    def prepare(self, exchange: Exchange, plans: dict[str, object], servers: dict[str, object]) -> None:
        """Set up ``exchange``'s instances (``{"parameter.group": plan}`` and their servers): their key
        messages wait for the next round trip to the nodes."""
        self.ahead[exchange] = {k: Instance(servers[k], plans[k], "advertise", servers[k].setup()) for k in plans}

    def planned(self, exchange: Exchange, plans: dict[str, object]) -> bool:
        """Whether ``exchange``'s instances were set up ahead for exactly these plans."""
        got = self.ahead.get(exchange)
        return got is not None and set(got) == set(plans) and all(_same(got[k].plan, plans[k]) for k in plans)

    def ready(self, exchange: Exchange) -> None:
        """Run, in round trips of their own, the key rounds of ``exchange``'s instances that have not
        ridden on earlier ones (the first exchange of a run; an exchange whose plan changed)."""
        for _ in range(2):
            waiting = [i for i in self.ahead.get(exchange, {}).values() if i.phase in ("advertise", "share")]
            if not waiting:
                return
            payloads: dict[int, RecordDict] = {}
            asked = self.attach(payloads, exchange, own=True)
            start = time.perf_counter()
            replies = self.cluster.send("train.secagg", payloads)
            self.seconds += time.perf_counter() - start
            self.round_trips += 1
            self.absorb(self.answers(replies, asked))

    def intact(self, exchange: Exchange) -> bool:
        """Whether every instance of ``exchange`` kept, through its key rounds, every client that is
        to send a masked input (a node that missed a round trip these rode on would otherwise sit out
        the exchange as well)."""
        for inst in self.ahead.get(exchange, {}).values():
            if inst.failed is not None:
                return False
            masked = PHASES.index("masked")
            expected = {c for c in inst.plan.everyone if PHASES.index(inst.plan.drops.get(c, "masked")) >= masked}
            if not expected <= set(getattr(inst.server, "u2", ())):
                return False
        return True

    def discard(self, before: Exchange | None = None) -> None:
        """Forget instances of exchanges before ``before`` (all: None)."""
        for exchange in [e for e in self.ahead if before is None or e < before]:
            del self.ahead[exchange]

    def attach(self, payloads: dict[int, RecordDict], exchange: Exchange | None, own: bool = False) -> dict:
        """Add the waiting messages of the instances set up ahead to ``payloads`` (a round trip's
        messages, by node): the masked-input requests of ``exchange`` (its train message) and the key
        rounds of every other instance. ``own``: a round trip of their own (it may address any node);
        else an instance rides only if every node it needs is already addressed. Returns what was
        asked, ``{node: {entry: (exchange, key, phase, client)}}``."""
        asked: dict[int, dict] = {}
        for ex, instances in self.ahead.items():
            for key, inst in instances.items():
                if inst.sent or inst.failed is not None or inst.phase == "unmask":
                    continue
                if inst.phase == "masked" and (ex != exchange or own):
                    continue  # masked inputs travel with their own exchange's train message
                entries = self._entries(inst, ex, key)
                if not own and not set(entries) <= set(payloads):
                    continue
                for node, fields in entries.items():
                    if node not in payloads:
                        payloads[node] = R.content({**self.header(*ex)})
                    for entry, (record, client) in fields.items():
                        payloads[node].config_records[entry] = record
                        asked.setdefault(node, {})[entry] = (ex, key, inst.phase, client)
                inst.sent = True
        return asked

    def _entries(self, inst: Instance, exchange: Exchange, key: str) -> dict[int, dict]:
        from pfpl.secure import wire

        order = PHASES.index(inst.phase)
        out: dict[int, dict] = {}
        for client, message in inst.inbox.items():
            if client in inst.plan.drops and PHASES.index(inst.plan.drops[client]) <= order:
                continue  # a simulated dropout: gone before this phase
            fields = wire.to_fields(message)
            if inst.phase == "advertise":
                fields["summands"] = len(inst.plan.everyone)
            node = self.cluster.node_of[client]
            out.setdefault(node, {})[R.secagg_key(inst.phase, exchange, key, client)] = (ConfigRecord(fields), client)
        return out

    def absorb(self, answers: dict[tuple, list]) -> None:
        """A round trip's answers (:meth:`answers`) for the instances whose messages rode on it: each
        collects its phase's answers and waits at its next phase (a masked phase keeps them for the
        session)."""
        collect = {"advertise": "collect_keys", "share": "collect_shares"}
        from pfpl.secure.protocol import SecureAggregationError

        for ex, instances in self.ahead.items():
            for key, inst in instances.items():
                if not inst.sent:
                    continue
                inst.sent = False
                got = answers.get((ex, key), [])
                if inst.phase == "masked":
                    inst.answers = got
                    continue
                try:
                    inst.inbox = getattr(inst.server, collect[inst.phase])(got)
                    inst.phase = PHASES[PHASES.index(inst.phase) + 1]
                except SecureAggregationError as err:
                    inst.failed = err

    def answers(self, replies: dict[int, RecordDict], asked: dict, whole: bool = True) -> dict[tuple, list]:
        """The protocol messages of a round trip's replies by (exchange, key) (``whole``: replies of
        ``train.secagg``, checked whole; a train reply is checked by the driver): only those asked for
        (that phase, that instance, a client of the answering node), of the phase's type and sent by
        their client; every other entry is rejected with its reason (its client is then treated as
        dropped)."""
        from pfpl.secure import wire
        from pfpl.secure.protocol import AdvertiseKeys, EncryptedShares, MaskedInput, UnmaskShares

        expected = {"advertise": AdvertiseKeys, "share": EncryptedShares, "masked": MaskedInput, "unmask": UnmaskShares}
        out: dict[tuple, list] = {}
        for node, reply in replies.items():
            mine = asked.get(node, {})
            try:
                if whole:  # a reply of its own: the bare header and secure-aggregation entries
                    R.header(reply, set())
                    R.only_records(reply, {R.PFPL}, prefix="secagg/")
            except ProtocolError as err:
                self.cluster._reject(node, "secure aggregation", str(err))
                continue
            for entry, record in reply.config_records.items():
                if not entry.startswith("secagg/"):
                    continue
                try:
                    if entry not in mine:
                        raise ProtocolError(f"an answer for {entry} it was not asked for")
                    ex, key, phase, client = mine[entry]
                    message = wire.from_fields(dict(record), expected[phase])
                    if message.sender != client:
                        raise ProtocolError(f"{entry} answered by client {message.sender}")
                    out.setdefault((ex, key), []).append(message)
                except (ValueError, TypeError) as err:  # ProtocolError is a ValueError
                    self.cluster._reject(node, "secure aggregation", f"{entry}: {err}")
            missing = sorted(set(mine) - set(reply.config_records))
            if missing:
                log.warning("flower: SuperNode %d did not answer %s (dropped)", node, missing)
        return out

    # ---- the aggregator's session (pfpl.secure.aggregator.SecureAggregator.session) ---------------
    def resume(self, c, plans: dict) -> dict:
        """The instances of contributions ``c`` set up ahead, by group: ``(server, "masked", masked
        inputs)`` ready to unmask, or the error that stopped one while it was set up. An instance is
        used once; one whose plan is not the session's (a client it never counted) is not used."""
        instances = self.ahead.get((c.round, c.step), {})
        out = {}
        for g, plan in plans.items():
            inst = instances.pop(f"{c.index}.{g}", None)
            if inst is None:
                continue
            if inst.failed is not None:
                out[g] = inst.failed
            elif inst.phase == "masked" and inst.answers is not None and set(plan.everyone) <= set(inst.plan.everyone):
                out[g] = (inst.server, "masked", inst.answers)
        return out

    def deliver_for(self, c, plans: dict) -> Callable[[str, dict], dict]:
        """``deliver(phase, inbox)`` for the instances of contributions ``c`` (``plans``: group -> plan):
        masked inputs an instance set up ahead already has are handed over as they are (a list of
        answers, not messages to send); every other phase is a round trip (:meth:`round_trip`)."""
        keys = {g: f"{c.index}.{g}" for g in plans}

        def deliver(phase: str, inbox: dict) -> dict:
            out = {g: messages for g, messages in inbox.items() if isinstance(messages, list)}
            send = {keys[g]: messages for g, messages in inbox.items() if not isinstance(messages, list)}
            if send:
                answers = self.round_trip((c.round, c.step), phase, send, {keys[g]: plans[g] for g in plans})
                out.update({g: answers[keys[g]] for g in inbox if keys[g] in send})
            return out

        return deliver

    def round_trip(self, exchange: Exchange, phase: str, inbox: dict, plans: dict) -> dict[str, list]:
        """One phase of instances of ``exchange`` (``inbox``: ``{"parameter.group": {client: message}}``,
        ``plans`` by the same keys) in a ``train.secagg`` round trip of its own, which the key rounds of
        instances set up ahead ride on; the answers by key (:meth:`answers`)."""
        start = time.perf_counter()
        payloads: dict[int, RecordDict] = {}
        asked: dict[int, dict] = {}
        for key, messages in inbox.items():
            inst = Instance(None, plans[key], phase, messages)
            for node, fields in self._entries(inst, exchange, key).items():
                payloads.setdefault(node, R.content(self.header(*exchange)))
                for entry, (record, client) in fields.items():
                    payloads[node].config_records[entry] = record
                    asked.setdefault(node, {})[entry] = (exchange, key, phase, client)
        riding = self.attach(payloads, None)
        replies = self.cluster.send("train.secagg", payloads) if payloads else {}
        self.seconds += time.perf_counter() - start
        self.round_trips += 1
        for node, extra in riding.items():
            asked.setdefault(node, {}).update(extra)
        answers = self.answers(replies, asked)
        self.absorb(answers)
        return {key: answers.get((exchange, key), []) for key in inbox}
