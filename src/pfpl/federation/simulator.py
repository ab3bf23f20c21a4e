"""The in-process simulator: a driver over the client update and the server (DESIGN §4).

All participating clients train together: their rows are gathered from ``[N, ...]`` tables, one
:class:`~pfpl.federation.client.ClientUpdate` call serves all of them (one text-tower call for
every client's classes, ``[clients × classes, L, D]``), and the server combines their uploads.
The tower's memory budget (``max_sequences``: text-tower sequences whose activations are alive at
once) splits the participants into calls of at most ``max_sequences // classes`` clients, so peak
memory does not grow with the number of clients. With ``one_client_calls`` the same round runs as
B separate one-client calls, each drawing its own batches — what a deployment with one client per
node does; the results are the same either way.

Randomness comes from per-client named streams (:mod:`pfpl.streams`): public draws from the seed,
mechanism draws from each client's (and the server's) :class:`~pfpl.streams.Streams` — secret in a
private run, and part of the checkpoint — so a run resumed from the checkpoint of round r continues
exactly as the uninterrupted run would.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pfpl.algorithms.base import Method
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import ClientState, ClientUpdate, TrainSettings, steps_per_round
from pfpl.federation.server import Server
from pfpl.messages import Aggregator, Upload
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.mechanisms import GradientMechanism
from pfpl.streams import SERVER, Purpose, Streams, client_streams, stream


class Charges(Protocol):
    """What each round costs in privacy (a :class:`~pfpl.privacy.plan.PrivacyPlan`)."""

    accountant: str

    def charge_round(self, ledger: Accountant, size: int, steps: int) -> None: ...

    def charge_client_level(self, ledger: Accountant) -> None: ...


class ServerPhase(Protocol):
    """Work between rounds (SecFPP's clustering, FedSP's server fine-tuning): runs after every round
    with the simulator, whose server it may regroup or update."""

    def __call__(self, sim: Simulator, round_index: int) -> None: ...


class Simulator:
    """Trains one method's prompts for every client of a partition."""

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
        # the clients' mechanism draws (batches, DP noise, distributed-DP shares) and the server's
        self.streams = streams or Streams(settings.seed)
        if server_streams is None:
            server_streams = Streams.create(settings.seed, [SERVER], secret=self.streams.mode == "secret")
        self.device = data.device
        self.n_clients = data.n_clients
        self.sizes = torch.tensor(data.sizes(), dtype=torch.float32, device=self.device)
        self.local_steps = steps_per_round(data.sizes(), settings)
        # a method with several stages (FedSP) draws fresh batches for each: steps a record may meet
        self.steps_per_round = self.local_steps * len(method.stages())
        self.one_client_calls = one_client_calls
        self.update = ClientUpdate(method, tower, settings, scale, reference, mechanism)
        # clients per client-update call: the tower's sequence budget over each client's C sequences
        # (C per record of its batch when the mechanism backpropagates every record at once)
        per_record = getattr(self.update.mechanism, "per_record_backward", False)
        alive = tower.num_classes * (settings.batch_size if per_record else 1)
        self.clients_per_call = max(1, tower.max_sequences // alive)
        self.phases = list(phases or [])
        n_ctx, dim = tower.n_ctx, tower.backbone.ctx_dim
        shared = method.init_shared(n_ctx, dim, stream(settings.seed, Purpose.INIT_SHARED))
        self.server = Server(
            method,
            settings,
            self.n_clients,
            {k: v.to(self.device) for k, v in shared.items()},
            aggregator,
            streams=server_streams,
        )
        held = data.held_classes(tower.num_classes)
        rows = [
            method.init_local(n_ctx, dim, stream(settings.seed, Purpose.INIT_LOCAL, client=c), held[c])
            for c in range(self.n_clients)
        ]
        self.local = {k: torch.stack([r[k] for r in rows]).to(self.device) for k in method.local_params}
        self.momentum: dict[str, torch.Tensor] = {}
        self.participations = torch.zeros(self.n_clients, dtype=torch.long)  # rounds each client took part in
        # each client's accountant for its own records, and the federation's client-level one
        self.charges = charges
        kind = charges.accountant if charges is not None else "rdp"
        self.ledgers = [Accountant(kind) for _ in range(self.n_clients)]
        self.client_level = Accountant(kind)

    @property
    def round(self) -> int:
        return self.server.round

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every persistent parameter: shared ones ``[G, ...]`` (the server's), local ones ``[N, ...]``."""
        return {**self.server.shared, **self.local}

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs — including the clients' and the server's secrets in a private
        run (a checkpoint is secret material)."""
        return {
            "streams": self.streams.state_dict(),
            "server": self.server.state_dict(),
            "local": {k: v.clone() for k, v in self.local.items()},
            "momentum": {k: v.clone() for k, v in self.momentum.items()},
            "participations": self.participations.clone(),
            "ledgers": [x.state_dict() for x in self.ledgers],
            "client_level": self.client_level.state_dict(),
            "phases": [list(getattr(p, "log", [])) for p in self.phases],
            "secure_failures": list(getattr(self.server.aggregator, "failures", [])),
        }

    def load_state_dict(self, state: dict) -> None:
        self.streams.load_state_dict(state["streams"])
        self.server.load_state_dict(state["server"])
        self.local = {k: v.clone().to(self.device) for k, v in state["local"].items()}
        self.momentum = {k: v.clone().to(self.device) for k, v in state["momentum"].items()}
        self.participations = state["participations"].clone()
        self.ledgers = [Accountant.from_state(x) for x in state["ledgers"]]
        self.client_level = Accountant.from_state(state["client_level"])
        for phase, log in zip(self.phases, state.get("phases", [])):
            if hasattr(phase, "log"):
                phase.log[:] = log
        if hasattr(self.server.aggregator, "failures"):
            self.server.aggregator.failures[:] = state.get("secure_failures", [])

    # ---- one round ---------------------------------------------------------------------------
    def _gather(self, active: torch.Tensor) -> ClientState:
        rows = active.to(self.device)
        return ClientState(
            active,
            {k: v[rows].clone() for k, v in self.local.items()},
            {k: v[rows].clone() for k, v in self.momentum.items()},
        )

    def _scatter(self, state: ClientState) -> None:
        rows = state.clients.to(self.device)
        for k, v in state.params.items():
            self.local[k][rows] = v
        for k, v in state.momentum.items():
            if k not in self.momentum:
                self.momentum[k] = torch.zeros(self.n_clients, *v.shape[1:], dtype=v.dtype, device=self.device)
            self.momentum[k][rows] = v

    def _batches(self, active: torch.Tensor, r: int):
        s = self.s
        if len(active) == 0:
            return []
        if not self.one_client_calls:
            return self.data.batches(active, self.steps_per_round, s.batch_size, s.sampling, self.streams, r)
        return [
            self.data.batches(active[i : i + 1], self.steps_per_round, s.batch_size, s.sampling, self.streams, r)
            for i in range(len(active))
        ]

    def _exchange(self, state: ClientState, batches, sizes: torch.Tensor, r: int, step: int, steps: slice) -> Upload:
        """Client-update calls for the participants (as many as the memory budget needs, or one per
        participant), then the server."""
        if len(state.clients) == 0:
            upload = self.server.empty_upload()
        elif self.one_client_calls:
            upload = self._calls(state, 1, lambda i, j: batches[i][steps], sizes, r, step)
        elif len(state.clients) <= self.clients_per_call:
            upload = self.update(
                self.server.broadcast(state.clients), state, batches[steps], sizes, r, step, self.streams
            )
        else:
            rows = lambda i, j: [b.rows(i, j) for b in batches[steps]]
            upload = self._calls(state, self.clients_per_call, rows, sizes, r, step)
        self.server.receive(upload, r, step)
        return upload

    def _calls(self, state: ClientState, width: int, batches_of, sizes: torch.Tensor, r: int, step: int) -> Upload:
        """The participants in client-update calls of at most ``width`` clients each."""
        parts = []
        for i in range(0, len(state.clients), width):
            j = min(i + width, len(state.clients))
            part = state.rows(i, j)
            shared = self.server.broadcast(part.clients)
            parts.append(self.update(shared, part, batches_of(i, j), sizes[i:j], r, step, self.streams))
            state.write_rows(i, part)
        return Upload.concat(parts)

    def run_round(self) -> dict[str, float]:
        """One round: every participant takes ``local_steps`` steps; the server syncs the shared part."""
        r = self.round
        failed_before = len(getattr(self.server.aggregator, "failures", ()))
        active = self.server.participants(r)
        state = self._gather(active)
        sizes = self.sizes[active.to(self.device)]
        batches = self._batches(active, r)
        if self.s.sync == "step":
            losses = [
                self._exchange(state, batches, sizes, r, k, slice(k, k + 1)).loss for k in range(self.local_steps)
            ]
            loss = torch.stack(losses).mean()
        else:
            loss = self._exchange(state, batches, sizes, r, 0, slice(None)).loss.mean()
        self._scatter(state)
        self.participations[active] += 1
        self._charge(active)
        for phase in self.phases:
            phase(self, r)
        self.server.end_round()
        info = {"loss": float(loss), "lr": self.s.lr_at(r), "participants": len(active)}
        if hasattr(self.server.aggregator, "failures"):  # secure aggregation: instances skipped this round
            info["secure_failures"] = len(self.server.aggregator.failures) - failed_before
        return info

    def _charge(self, active: torch.Tensor) -> None:
        """Record what this round cost: each participant's records, and the federation's clients."""
        if self.charges is None:
            return
        for c in active.tolist():
            self.charges.charge_round(self.ledgers[c], len(self.data.clients[c]), self.steps_per_round)
        self.charges.charge_client_level(self.client_level)

    # ---- released prompts --------------------------------------------------------------------
    @torch.no_grad()
    def personalized_context(self) -> torch.Tensor:
        """Every client's released context ``[N, M, D]`` (or ``[N, C, M, D]``); factorizations come
        from each client's release stream."""
        everyone = torch.arange(self.n_clients)
        params = {**self.server.broadcast(everyone), **self.local}
        return self.method.context(params, client_streams(self.s.seed, Purpose.RELEASE, everyone))

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """Every client's class text features ``[N, C, E]``."""
        everyone = torch.arange(self.n_clients)
        params = {**self.server.broadcast(everyone), **self.local}
        gens = client_streams(self.s.seed, Purpose.RELEASE, everyone)
        return self.method.release_features(self.tower, params, gens)
