"""The in-process simulator: a driver over the client update and the server (DESIGN §4).

All participating clients train together: one :class:`~pfpl.federation.host.ClientHost` holds every
client, one :class:`~pfpl.federation.client.ClientUpdate` call serves all participants (one
text-tower call for every client's classes, ``[clients × classes, L, D]``) within the tower's
memory budget, and the server combines their uploads; the round loop is
:class:`~pfpl.federation.rounds.Rounds`, the same one Flower drives over messages. With
``one_client_calls`` the same round runs as B separate one-client calls, each drawing its own
batches — what a deployment with one client per node does; the results are the same either way.

Randomness comes from per-client named streams (:mod:`pfpl.streams`): public draws from the seed,
mechanism draws from each client's (and the server's) :class:`~pfpl.streams.Streams` — secret in a
private run, and part of the checkpoint — so a run resumed from the checkpoint of round r continues
exactly as the uninterrupted run would.
"""

from __future__ import annotations

import torch

from pfpl.algorithms.base import Method
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import ClientUpdate, TrainSettings
from pfpl.federation.host import Charges, ClientHost
from pfpl.federation.rounds import Rounds, ServerPhase
from pfpl.federation.server import Server
from pfpl.messages import Aggregator, Upload
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.mechanisms import GradientMechanism
from pfpl.streams import SERVER, Purpose, Streams, stream

__all__ = ["Charges", "InProcess", "ServerPhase", "Simulator"]


class InProcess:
    """The simulator's transport: the server calls the clients' host directly."""

    def __init__(self, host: ClientHost):
        self.host = host

    def exchange(self, ids, shared, round_index, step, steps, last) -> Upload:
        upload = self.host.exchange(shared, ids, round_index, step, steps)
        if last:
            self.host.finish_round(ids.tolist())
        return upload

    def ask(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]:
        return self.host.answer(kind, requests)


class Simulator:
    """Trains one method's prompts for every client of a partition: one host of every client, the
    server, and the round loop between them."""

    def __init__(
        self,
        method: Method,
        tower: PromptTower,
        data: ClientData,
        settings: TrainSettings,
        scale: float,
        reference: torch.Tensor | None = None,
        mechanism: GradientMechanism | None = None,
        aggregator: Aggregator | None = None,
        one_client_calls: bool = False,
        phases: list[ServerPhase] | None = None,
        charges: Charges | None = None,
        streams: Streams | None = None,
        server_streams: Streams | None = None,
    ):
        self.method, self.tower, self.data, self.s = method, tower, data, settings
        streams = streams or Streams(settings.seed)
        if server_streams is None:
            server_streams = Streams.create(settings.seed, [SERVER], secret=streams.mode == "secret")
        self.device = data.device
        self.n_clients = data.n_clients
        update = ClientUpdate(method, tower, settings, scale, reference, mechanism)
        self.host = ClientHost(
            method, tower, data, settings, update, range(self.n_clients), streams, charges, one_client_calls
        )
        shared = method.init_shared(tower.n_ctx, tower.backbone.ctx_dim, stream(settings.seed, Purpose.INIT_SHARED))
        self.server = Server(
            method,
            settings,
            self.n_clients,
            {k: v.to(self.device) for k, v in shared.items()},
            aggregator,
            streams=server_streams,
        )
        self.charges = charges
        kind = charges.accountant if charges is not None else "rdp"
        self.rounds = Rounds(
            self.server,
            InProcess(self.host),
            settings,
            self.host.local_steps,
            self.host.steps_per_round,
            charges,
            Accountant(kind),
            list(phases or []),
        )

    # ---- the host's state, by its old names (every client is hosted here: rows are client ids) ----
    @property
    def update(self) -> ClientUpdate:
        return self.host.update

    @update.setter
    def update(self, value) -> None:
        self.host.update = value

    @property
    def streams(self) -> Streams:
        return self.host.streams

    @property
    def local(self) -> dict[str, torch.Tensor]:
        return self.host.params

    @local.setter
    def local(self, value: dict[str, torch.Tensor]) -> None:
        self.host.params = value

    @property
    def momentum(self) -> dict[str, torch.Tensor]:
        return self.host.momentum

    @property
    def participations(self) -> torch.Tensor:
        return self.host.participations

    @property
    def ledgers(self) -> list[Accountant]:
        return self.host.ledgers

    @property
    def sizes(self) -> torch.Tensor:
        return self.host.sizes

    @property
    def local_steps(self) -> int:
        return self.host.local_steps

    @property
    def steps_per_round(self) -> int:
        return self.host.steps_per_round

    @property
    def clients_per_call(self) -> int:
        return self.host.clients_per_call

    @property
    def one_client_calls(self) -> bool:
        return self.host.one_client_calls

    @one_client_calls.setter
    def one_client_calls(self, value: bool) -> None:
        self.host.one_client_calls = bool(value)

    @property
    def client_level(self) -> Accountant:
        return self.rounds.client_level

    @property
    def phases(self) -> list[ServerPhase]:
        return self.rounds.phases

    @phases.setter
    def phases(self, value: list[ServerPhase]) -> None:
        self.rounds.phases = list(value)

    @property
    def round(self) -> int:
        return self.server.round

    @property
    def settings(self) -> TrainSettings:
        return self.s

    def ask(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]:
        """A server phase's question to the clients (:meth:`~pfpl.federation.rounds.Transport.ask`)."""
        return self.rounds.transport.ask(kind, requests)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every persistent parameter: shared ones ``[G, ...]`` (the server's), local ones ``[N, ...]``."""
        return {**self.server.shared, **self.local}

    def _gather(self, active: torch.Tensor):
        return self.host.gather(active)

    def _batches(self, active: torch.Tensor, r: int):
        if self.one_client_calls:
            return [self.host.batches(active[i : i + 1], r) for i in range(len(active))]
        return self.host.batches(active, r)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs — including the clients' and the server's secrets in a private
        run (a checkpoint is secret material)."""
        return {
            "host": self.host.state_dict(),
            "server": self.server.state_dict(),
            "client_level": self.client_level.state_dict(),
            "phases": [list(getattr(p, "log", [])) for p in self.phases],
            "secure_failures": list(getattr(self.server.aggregator, "failures", [])),
        }

    def load_state_dict(self, state: dict) -> None:
        self.host.load_state_dict(state["host"])
        self.server.load_state_dict(state["server"])
        self.rounds.client_level = Accountant.from_state(state["client_level"])
        for phase, log in zip(self.phases, state.get("phases", [])):
            if hasattr(phase, "log"):
                phase.log[:] = log
        if hasattr(self.server.aggregator, "failures"):
            self.server.aggregator.failures[:] = state.get("secure_failures", [])

    # ---- one round ---------------------------------------------------------------------------
    def run_round(self) -> dict[str, float]:
        """One round: every participant takes ``local_steps`` steps; the server syncs the shared part."""
        return self.rounds.run_round(self)

    # ---- released prompts --------------------------------------------------------------------
    def _everyone_shared(self) -> dict[str, torch.Tensor]:
        return self.server.broadcast(torch.arange(self.n_clients))

    @torch.no_grad()
    def personalized_context(self) -> torch.Tensor:
        """Every client's released context ``[N, M, D]`` (or ``[N, C, M, D]``); factorizations come
        from each client's release stream."""
        return self.host.context(self._everyone_shared())

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """Every client's class text features ``[N, C, E]``."""
        return self.host.release_features(self._everyone_shared())

    @torch.no_grad()
    def vision_prompts(self) -> torch.Tensor | None:
        """Every client's vision prompts ``[N, depth, P, W]`` (None: the method prompts only text)."""
        return self.host.release_vision(self._everyone_shared())
