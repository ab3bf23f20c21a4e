"""One method's round, written once (DESIGN §4): the server picks the participants; each exchange's
shared values go out through a transport and the clients' uploads come back to the server, whose
aggregator combines them (DP wrappers, or a secure-aggregation session carried by the same
transport); then the client-level charge, the server phases and the end of the round. The simulator
and Flower are two transports of it: in-process calls to a :class:`~pfpl.federation.host.ClientHost`,
or Message round trips to the SuperNodes' hosts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from pfpl.federation.client import TrainSettings
from pfpl.federation.server import Server
from pfpl.messages import Upload
from pfpl.privacy.accounting import Accountant


class Transport(Protocol):
    """How the server reaches its clients."""

    def exchange(
        self, ids: torch.Tensor, shared: dict[str, torch.Tensor], round_index: int, step: int, steps: int, last: bool
    ) -> Upload:
        """``ids`` (non-empty) take ``steps`` local steps from step ``step`` of the round from the shared
        values each received (``[B, ...]``); ``last``: the round's last exchange, after which each is
        charged its round. Returns what was delivered (clients that did not answer are missing)."""
        ...

    def ask(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]:
        """A server phase's question: each client id gets its request (flat values: numpy arrays, bytes,
        ints, floats, strings and lists of those) and answers it from its own state, through the
        method's client side for ``kind`` (:meth:`~pfpl.algorithms.base.Method.client_handlers`).
        Returns the replies of the clients that answered; replies are untrusted."""
        ...


class Engine(Protocol):
    """What a server phase is given: the server, the run's settings, the clients' training-set sizes,
    and the transport's :meth:`Transport.ask` — never a client's state."""

    server: Server
    settings: TrainSettings
    sizes: torch.Tensor

    def ask(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]: ...


class ServerPhase(Protocol):
    """Work between rounds (SecFPP's clustering, FedSP's server fine-tuning), after every round; what it
    needs from the clients it asks through ``engine.ask``."""

    def __call__(self, engine: Engine, round_index: int) -> None: ...


@dataclass
class Rounds:
    """The round loop of one method: the server, its transport, the privacy charges at the server."""

    server: Server
    transport: Transport
    settings: TrainSettings
    local_steps: int  # exchanges per round in step sync
    steps_per_round: int  # local steps per round (× stages)
    charges: object | None = None  # a PrivacyPlan: charge_client_level
    client_level: Accountant = field(default_factory=Accountant)
    phases: list[ServerPhase] = field(default_factory=list)

    def exchanges(self) -> list[tuple[int, int, bool]]:
        """(first step, steps, last) of every exchange of a round: one per step in step sync (DP-FPL's
        per-step gradient averaging), one for the whole round in FedAvg."""
        if self.settings.sync == "step":
            return [(k, 1, k == self.local_steps - 1) for k in range(self.local_steps)]
        return [(0, self.steps_per_round, True)]

    def step(self, active, round_index: int, step: int, steps: int, last: bool) -> Upload:
        """One exchange: the participants train from the shared values they receive, the server
        aggregates what they deliver (through its aggregator: DP wrappers, or a secure session)."""
        active = torch.as_tensor(active, dtype=torch.long)
        server = self.server
        if len(active):
            upload = self.transport.exchange(active, server.broadcast(active), round_index, step, steps, last)
        else:
            upload = server.empty_upload()
        server.receive(upload, round_index, step)
        return upload

    def run_round(self, engine: Engine | None = None) -> dict:
        """One round; ``engine`` is what the server phases are given (the simulator, or Flower's driver)."""
        server = self.server
        r = server.round
        failed_before = len(getattr(server.aggregator, "failures", ()))
        active = server.participants(r)
        losses = [self.step(active, r, step, steps, last).loss for step, steps, last in self.exchanges()]
        if self.charges is not None:
            self.charges.charge_client_level(self.client_level)
        for phase in self.phases:
            phase(engine, r)
        server.end_round()
        loss = torch.cat([x.flatten() for x in losses]).float().mean() if losses else torch.tensor(float("nan"))
        info = {"loss": float(loss), "lr": self.settings.lr_at(r), "participants": len(active)}
        if hasattr(server.aggregator, "failures"):  # secure aggregation: instances skipped this round
            info["secure_failures"] = len(server.aggregator.failures) - failed_before
        return info
