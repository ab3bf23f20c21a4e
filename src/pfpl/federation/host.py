"""The holder of client state (DESIGN §4): the clients one party hosts — every client in the
simulator, a SuperNode's on Flower — and everything private to them: local parameters, optimizer
rows, per-client accountants, participation counts and mechanism streams. It runs their client
updates and charges their rounds; the transports (:mod:`pfpl.federation.simulator`,
:mod:`pfpl.federation.flower.node`) only carry what goes in and out of it.

Rows are kept in the order of ``clients``; every call names clients by id. A round's exchanges run
their clients' updates in calls that fit the tower's memory budget (``max_sequences``: a call takes
``max_sequences // C`` clients, ``// (C × batch)`` under a mechanism that backpropagates every record
at once), or one call per client (``one_client_calls``: what one client per node does, and the
reference compute pattern ``pfpl bench`` times) — the results are the same either way. With vision
prompts a call also takes at most ``max_images // batch`` clients (images through the prompted image layers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from pfpl.algorithms.base import Method
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import Batch, ClientData
from pfpl.errors import PfplError, ProtocolError
from pfpl.federation.client import ClientState, ClientUpdate, TrainSettings, steps_per_round
from pfpl.messages import Upload
from pfpl.privacy.accounting import Accountant
from pfpl.streams import Purpose, Streams, client_streams, stream

log = logging.getLogger(__name__)


class Charges(Protocol):
    """What each round costs in privacy (a :class:`~pfpl.privacy.plan.PrivacyPlan`)."""

    accountant: str

    def charge_round(self, ledger: Accountant, size: int, steps: int) -> None: ...

    def charge_client_level(self, ledger: Accountant) -> None: ...

    def client_epsilon(self, ledger: Accountant, rounds_taken: int) -> float: ...


class ClientHost:
    """The hosted clients' private state and their client updates."""

    def __init__(
        self,
        method: Method,
        tower: PromptTower,
        data: ClientData,
        settings: TrainSettings,
        update: ClientUpdate,
        clients: Sequence[int],
        streams: Streams,
        charges: Charges | None = None,
        one_client_calls: bool = False,
    ):
        self.method, self.tower, self.data, self.s, self.update = method, tower, data, settings, update
        self.clients = [int(c) for c in clients]
        self.position = {c: i for i, c in enumerate(self.clients)}
        self.streams, self.charges, self.one_client_calls = streams, charges, one_client_calls
        self.device = data.device
        self.sizes = torch.tensor(data.sizes(), dtype=torch.float32, device=self.device)  # every client's
        self.local_steps = steps_per_round(data.sizes(), settings)
        # a method with several stages (FedSP) draws fresh batches for each: steps a record may meet
        self.steps_per_round = self.local_steps * len(method.stages())
        per_record = getattr(update.mechanism, "per_record_backward", False)
        alive = tower.num_classes * (settings.batch_size if per_record else 1)
        self.clients_per_call = max(1, tower.max_sequences // alive)
        if method.prompts_vision and tower.vision is not None:  # images through the prompted image layers
            self.clients_per_call = min(self.clients_per_call, max(1, tower.vision.max_images // settings.batch_size))
        n_ctx, dim = tower.n_ctx, tower.backbone.ctx_dim
        held = data.held_classes(tower.num_classes)
        rows = [
            method.init_local(n_ctx, dim, stream(settings.seed, Purpose.INIT_LOCAL, client=c), held[c])
            for c in self.clients
        ]
        self.params = {k: torch.stack([r[k] for r in rows]).to(self.device) for k in method.local_params}
        self.momentum: dict[str, torch.Tensor] = {}
        self.participations = torch.zeros(len(self.clients), dtype=torch.long)
        kind = charges.accountant if charges is not None else "rdp"
        self.ledgers = [Accountant(kind) for _ in self.clients]
        # the client side of the method's server phases, and what it keeps between their requests
        self.handlers = method.client_handlers()
        self.phase_state: dict[str, dict[int, object]] = {}

    def rows_of(self, ids: Sequence[int]) -> torch.Tensor:
        """The hosted rows of client ids (an error for a client this host does not hold)."""
        unknown = [c for c in ids if c not in self.position]
        if unknown:
            raise KeyError(f"clients {unknown} are not hosted here")
        return torch.tensor([self.position[int(c)] for c in ids], dtype=torch.long)

    # ---- state of some clients ---------------------------------------------------------------
    def gather(self, ids: torch.Tensor) -> ClientState:
        rows = self.rows_of(ids.tolist()).to(self.device)
        return ClientState(
            ids,
            {k: v[rows].clone() for k, v in self.params.items()},
            {k: v[rows].clone() for k, v in self.momentum.items()},
        )

    def scatter(self, state: ClientState) -> None:
        rows = self.rows_of(state.clients.tolist()).to(self.device)
        for k, v in state.params.items():
            self.params[k][rows] = v
        for k, v in state.momentum.items():
            if k not in self.momentum:
                self.momentum[k] = torch.zeros(len(self.clients), *v.shape[1:], dtype=v.dtype, device=self.device)
            self.momentum[k][rows] = v

    # ---- one exchange --------------------------------------------------------------------------
    def batches(self, ids: torch.Tensor, round_index: int, only: range | None = None) -> list[Batch]:
        """The batches of ``ids`` for the steps in ``only`` (default: every step of the round), from the
        clients' own streams."""
        s = self.s
        return self.data.batches(ids, self.steps_per_round, s.batch_size, s.sampling, self.streams, round_index, only)

    def exchange(
        self, shared: dict[str, torch.Tensor], ids: torch.Tensor, round_index: int, step: int, steps: int
    ) -> Upload:
        """``ids`` take ``steps`` local steps from step ``step`` of the round, from the shared values
        each received (``[B, ...]``); their state moves on here, and their upload comes back."""
        state = self.gather(ids)
        sizes = self.sizes[ids.to(self.device)]
        only = range(step, step + steps)
        if self.one_client_calls:
            per_client = [self.batches(ids[i : i + 1], round_index, only) for i in range(len(ids))]
            upload = self._calls(state, shared, 1, lambda i, j: per_client[i], sizes, round_index, step)
        else:
            batches = self.batches(ids, round_index, only)
            rows = lambda i, j: [b.rows(i, j) for b in batches]
            upload = self._calls(state, shared, self.clients_per_call, rows, sizes, round_index, step)
        self.scatter(state)
        return upload

    def _calls(self, state, shared, width: int, batches_of, sizes, round_index: int, step: int) -> Upload:
        """The clients in client-update calls of at most ``width`` clients each."""
        parts = []
        for i in range(0, len(state.clients), width):
            j = min(i + width, len(state.clients))
            part = state.rows(i, j)
            received = {k: v[i:j] for k, v in shared.items()}
            parts.append(self.update(received, part, batches_of(i, j), sizes[i:j], round_index, step, self.streams))
            state.write_rows(i, part)
        return Upload.concat(parts)

    def finish_round(self, ids: Sequence[int]) -> None:
        """The round is over for ``ids``: each is charged what it cost its records and counted."""
        for c in ids:
            row = self.position[int(c)]
            self.participations[row] += 1
            if self.charges is not None:
                self.charges.charge_round(self.ledgers[row], len(self.data.clients[int(c)]), self.steps_per_round)

    # ---- a server phase's questions --------------------------------------------------------------
    def answer(self, kind: str, requests: dict[int, dict]) -> dict[int, dict]:
        """Answer a server phase's requests to hosted clients, each from its own state; a client whose
        request its handler refuses (a :class:`~pfpl.errors.PfplError`) does not answer."""
        handler = self.handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"{self.method.name} has no server phase {kind!r} that asks its clients")
        unknown = sorted(int(c) for c in requests if int(c) not in self.position)
        if unknown:
            raise ProtocolError(f"a {kind!r} request for clients {unknown}, which are not hosted here")
        replies = {}
        for c, request in requests.items():
            try:
                replies[int(c)] = handler(self, int(c), request)
            except PfplError as err:
                log.warning("client %d did not answer a %s request: %s", c, kind, err)
        return replies

    def epsilons(self) -> list[float]:
        """Each hosted client's ε(δ) for its released prompt, from its own accountant."""
        if self.charges is None:
            return [float("inf")] * len(self.clients)
        return [self.charges.client_epsilon(led, int(n)) for led, n in zip(self.ledgers, self.participations)]

    # ---- what the hosted clients release --------------------------------------------------------
    def released_params(self, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every hosted client's parameters: the shared values it holds (``[H, ...]``) and its own."""
        return {**shared, **self.params}

    @torch.no_grad()
    def context(self, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each hosted client's released context; factorizations from each client's release stream."""
        gens = client_streams(self.s.seed, Purpose.RELEASE, self.clients)
        return self.method.context(self.released_params(shared), gens)

    @torch.no_grad()
    def release_features(self, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each hosted client's class text features ``[H, C, E]``."""
        gens = client_streams(self.s.seed, Purpose.RELEASE, self.clients)
        return self.method.release_features(self.tower, self.released_params(shared), gens)

    @torch.no_grad()
    def release_vision(self, shared: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each hosted client's vision prompts ``[H, depth, P, W]`` (None: the method has none)."""
        gens = client_streams(self.s.seed, Purpose.RELEASE, self.clients)
        return self.method.vision_prompts(self.released_params(shared), gens)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The hosted clients' state — their secrets included in a private run (secret material)."""
        return {
            "clients": list(self.clients),
            "streams": self.streams.state_dict(),
            "local": {k: v.clone() for k, v in self.params.items()},
            "momentum": {k: v.clone() for k, v in self.momentum.items()},
            "participations": self.participations.clone(),
            "ledgers": [x.state_dict() for x in self.ledgers],
        }

    def load_state_dict(self, state: dict) -> None:
        if [int(c) for c in state.get("clients", self.clients)] != self.clients:
            raise ValueError(f"a state of clients {state['clients']}, not of {self.clients}")
        self.streams.load_state_dict(state["streams"])
        self.params = {k: v.clone().to(self.device) for k, v in state["local"].items()}
        self.momentum = {k: v.clone().to(self.device) for k, v in state["momentum"].items()}
        self.participations = torch.as_tensor(state["participations"]).clone().long()
        self.ledgers = [Accountant.from_state(x) for x in state["ledgers"]]
