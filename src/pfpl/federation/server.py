"""The server (DESIGN §4): holds the shared parameters of every group, picks each round's
participants, broadcasts, combines the clients' uploads through its aggregator (which privacy and
secure summation wrap) and steps the shared parameters; a server phase may run between rounds."""

from __future__ import annotations

import torch

from pfpl.algorithms.base import Method
from pfpl.federation.client import TrainSettings, sgd_step
from pfpl.messages import PHASES, Aggregator, Contributions, Upload, WeightedMean, group_sum
from pfpl.streams import SERVER, Purpose, Streams, stream


class Server:
    def __init__(
        self,
        method: Method,
        settings: TrainSettings,
        n_clients: int,
        shared: dict[str, torch.Tensor],
        aggregator: Aggregator | None = None,
        n_groups: int = 1,
        streams: Streams | None = None,
    ):
        self.method, self.s, self.n_clients = method, settings, n_clients
        # the server's mechanism draws (client sampling, its DP noise): secret in a private run
        self.streams = streams or Streams(settings.seed)
        self.aggregator = aggregator or WeightedMean()
        self.n_groups = n_groups
        self.shared = {n: v.expand(n_groups, *v.shape).clone() for n, v in shared.items()}  # [G, ...]
        self.momentum: dict[str, torch.Tensor] = {}  # step sync: the server's optimizer state per group
        device = next(iter(self.shared.values())).device if self.shared else torch.device("cpu")
        self.groups = torch.zeros(n_clients, dtype=torch.long, device=device)  # group of every client
        # the size-weighted group means of what clients sent beyond the shared parameters (FedSP's
        # ``reference`` body upload): kept by the server, never broadcast
        self.received: dict[str, torch.Tensor] = {}
        self.round = 0

    # ---- one round -----------------------------------------------------------------------------
    def participants(self, round_index: int) -> torch.Tensor:
        """Every client (participation 1); else a uniform sample of ``round(participation · N)`` clients
        (at least one), or with ``client_sampling = "poisson"`` each client independently with
        probability ``participation`` (possibly none)."""
        if self.s.participation >= 1:
            return torch.arange(self.n_clients)
        draws = self.streams.draws(Purpose.PARTICIPANTS, round_index)
        if self.s.client_sampling == "poisson":
            return torch.nonzero(draws.uniform(self.n_clients) < self.s.participation).flatten()
        k = max(1, round(self.s.participation * self.n_clients))
        return draws.permutation(self.n_clients)[:k].sort().values

    def expected_contributions(self) -> torch.Tensor:
        """``[G]``: how many clients of each group take part in a round, in expectation."""
        members = group_sum(torch.ones(self.n_clients, device=self.groups.device), self.groups, self.n_groups)
        return members * min(1.0, self.s.participation)

    def broadcast(self, clients: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared parameters of each client's group, ``[B, ...]``."""
        g = self.groups[clients.to(self.groups.device)]
        return {n: v[g] for n, v in self.shared.items()}

    @torch.no_grad()
    def receive(self, upload: Upload, round_index: int, step: int = 0) -> None:
        """Aggregate one exchange's uploads per group and step the shared parameters."""
        if not self.s.train_shared or not self.shared:
            return
        upload, drops = self.deliver(upload, round_index, step)
        self._keep_extras(upload, self.groups[upload.clients.to(self.groups.device)])
        for i, name in enumerate(self.method.shared_params):
            c = self.contributions(upload, drops, name, round_index, step)
            agg = self.aggregator(c, self.streams.draws(Purpose.SERVER_NOISE, round_index, step, SERVER, i))
            self.apply(name, agg, self.aggregator.releases(c), round_index)

    def contributions(
        self, upload: Upload, drops: dict[int, tuple[str, int]], name: str, round_index: int, step: int
    ) -> Contributions:
        """What the aggregator of shared parameter ``name`` sees of one exchange's delivered uploads."""
        return Contributions(
            upload.values[name],
            upload.sizes,
            upload.clients,
            self.groups[upload.clients.to(self.groups.device)],
            self.n_groups,
            self.expected_contributions(),
            round_index,
            step,
            self.method.shared_params.index(name),
            drops,
        )

    @torch.no_grad()
    def apply(self, name: str, agg: torch.Tensor, touched: torch.Tensor, round_index: int) -> None:
        """Step the groups ``touched`` of shared parameter ``name`` by their aggregate ``agg`` ``[G, ...]``."""
        if self.s.sync == "step":
            if name not in self.momentum:
                self.momentum[name] = torch.zeros_like(self.shared[name])
            lr = self.s.lr_at(round_index)
            p, m = sgd_step(self.shared[name], self.momentum[name], agg, lr, self.s.momentum, self.s.weight_decay)
            self.shared[name][touched], self.momentum[name][touched] = p[touched], m[touched]
        else:
            self.shared[name][touched] += agg[touched]

    def _keep_extras(self, upload: Upload, groups: torch.Tensor) -> None:
        if not upload.extras or len(upload.clients) == 0:
            return
        weights = upload.sizes.to(self.groups.device, torch.float64)
        totals = group_sum(weights, groups, self.n_groups)
        for name, value in upload.extras.items():
            coef = (weights / totals[groups].clamp(min=1e-12)).view(-1, *[1] * (value.dim() - 1))
            mean = group_sum(value.to(self.groups.device, torch.float64) * coef, groups, self.n_groups)
            old = self.received.get(name)
            kept = torch.zeros_like(mean) if old is None else old.to(mean)
            present = totals > 0
            kept[present] = mean[present]  # a group with no delivery keeps its last mean
            self.received[name] = kept.to(value.dtype)

    def deliver(self, upload: Upload, round_index: int, step: int) -> tuple[Upload, dict[int, tuple[str, int]]]:
        """Which uploads arrive: with ``dropout`` p each participant drops out of the exchange with
        probability p, at a phase drawn uniformly from the secure protocol's four (advertise keys,
        share keys, masked input, unmasking); before the masked input its upload is lost, while
        unmasking it still counts. Returns the delivered uploads and ``{client: (phase, group)}``."""
        if self.s.dropout == 0 or len(upload.clients) == 0:
            return upload, {}
        drops = self.dropouts(upload.clients.tolist(), round_index, step)
        keep = [
            row for row, client in enumerate(upload.clients.tolist()) if drops.get(client, ("unmask",))[0] == "unmask"
        ]
        rows = torch.tensor(keep, dtype=torch.long)
        kept = Upload(
            upload.clients[rows],
            {k: v[rows.to(v.device)] for k, v in upload.values.items()},
            upload.sizes[rows.to(upload.sizes.device)],
            upload.loss[rows.to(upload.loss.device)],
            {k: v[rows.to(v.device)] for k, v in upload.extras.items()},
        )
        return kept, drops

    def dropouts(self, clients: list[int], round_index: int, step: int) -> dict[int, tuple[str, int]]:
        """The simulated dropouts of an exchange, ``{client: (phase, group)}`` (none without
        ``dropout``): drawn per (round, step, client), so a transport that sets up an exchange's secure
        instances ahead of it knows them as the aggregator will."""
        drops: dict[int, tuple[str, int]] = {}
        if self.s.dropout == 0:
            return drops
        for client in clients:
            draw = torch.rand(2, generator=stream(self.s.seed, Purpose.DROPOUT, round_index, step, int(client)))
            if float(draw[0]) < self.s.dropout:
                drops[int(client)] = (PHASES[min(3, int(float(draw[1]) * 4))], int(self.groups[client]))
        return drops

    def empty_upload(self) -> Upload:
        """What a round with no participants delivers: nothing, in the right shapes."""
        device = self.groups.device
        none = torch.zeros(0, dtype=torch.long, device=device)
        values = {n: torch.zeros(0, *v.shape[1:], dtype=v.dtype, device=v.device) for n, v in self.shared.items()}
        return Upload(none, values, torch.zeros(0, device=device), torch.zeros(0, device=device))

    def end_round(self) -> None:
        self.round += 1

    @torch.no_grad()
    def regroup(self, groups: torch.Tensor, sizes: torch.Tensor) -> None:
        """Assign clients to new groups (a server phase, e.g. SecFPP's clustering). Each new group's
        shared parameters start from its members' old group values, weighted by training-set size;
        the server's optimizer state starts afresh."""
        groups = groups.to(self.groups.device, torch.long)
        if groups.shape != self.groups.shape or (len(groups) and int(groups.min()) < 0):
            raise ValueError(f"a group assignment needs one non-negative group per client ({self.n_clients})")
        n_groups = int(groups.max()) + 1 if len(groups) else 1
        weights = sizes.to(self.groups.device, torch.float64)
        totals = group_sum(weights, groups, n_groups).clamp(min=1e-12)
        for name, value in self.shared.items():
            old = value[self.groups].to(torch.float64)  # [N, ...]: each client's current group value
            coef = (weights / totals[groups]).view(-1, *[1] * (old.dim() - 1))
            self.shared[name] = group_sum(old * coef, groups, n_groups).to(value.dtype)
        self.groups, self.n_groups = groups.clone(), n_groups
        self.momentum = {}

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "streams": self.streams.state_dict(),
            "round": self.round,
            "shared": {k: v.clone() for k, v in self.shared.items()},
            "momentum": {k: v.clone() for k, v in self.momentum.items()},
            "groups": self.groups.clone(),
            "received": {k: v.clone() for k, v in self.received.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if "streams" in state:
            self.streams.load_state_dict(state["streams"])
        self.round = int(state["round"])
        self.shared = {k: v.clone() for k, v in state["shared"].items()}
        self.momentum = {k: v.clone() for k, v in state["momentum"].items()}
        self.groups = state["groups"].clone()
        self.received = {k: v.clone() for k, v in state.get("received", {}).items()}
        self.n_groups = max(self.n_groups, int(self.groups.max()) + 1 if len(self.groups) else 1)
