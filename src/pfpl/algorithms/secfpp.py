"""SecFPP (DESIGN §1, §5): a domain-level prompt shared inside a cluster of clients whose data look
alike, plus class-level prompts that never leave the client.

Client i's context for class j is ``domain[k(i)] + class[i, j]`` — the paper's P_i = P_G + P_L with
CoOp's class-specific context as the local part — where k(i) is the client's cluster (its group on
the server). The class-level prompt is full rank, or ``U_ij · V_i`` with a rank-r U per class and one
V per client (``secfpp.class_rank``). Which classes carry one is the client's ``held`` mask: in a
non-private run the classes its records hold (class[i, j] is zero and frozen for the others); in a
private run every class (``covers_all_classes``): a row present only for the classes a client holds
would reveal its label set whatever the noise, so every row trains through the DP mechanism and
the released prompt's structure does not depend on the records — unless the label set is declared
public (``secfpp.public_label_set``), which the prompt's certificate then states.

After the first round and then every ``secfpp.recluster_every`` rounds, the server runs SecPC
(:mod:`pfpl.secure.secpc`) on a per-client vector each client computes from its own data and
regroups the clients by the clusters it finds; each new cluster's domain prompt starts from its
members' size-weighted domain prompts. The vector (``secfpp.cluster_on``) is the client's mean
image feature (``images``, the default: it carries the client's style) or its personalized prompt,
the mean class-level prompt over the classes it holds (``prompts``, the paper's choice; on the
embedded benchmark prompts learned on disjoint class subsets encode classes, not styles —
docs/design-notes.md has the measurements). The variants
``secfpp-plain`` (the same clustering in the clear, for comparison) and ``secfpp-global`` (no
clustering: one global domain prompt) are the ablations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pfpl.algorithms.base import Method, Param, Scope, Views, leaf, normal
from pfpl.errors import ProtocolError
from pfpl.secure.secpc import SecPCSettings, cluster
from pfpl.secure.secpc_protocol import SecPCClient, run_secpc


class SecFPP(Method):
    name = "secfpp"
    secure_clustering: bool | None = True  # None: no clustering

    def __init__(self, settings=None):
        super().__init__(settings)
        self.rank = int(self.settings.extra.get("class_rank", 1))
        self.every = int(self.settings.extra.get("recluster_every", 5))
        self.cluster_on = str(self.settings.extra.get("cluster_on", "images"))
        # a private run: every class carries a class-level prompt (None: the client's held classes)
        self.covers_all_classes = bool(self.settings.extra.get("covers_all_classes", False))
        self.secpc: SecPCSettings = self.settings.extra.get("secpc", SecPCSettings())
        local = (
            (Param("class_u", Scope.LOCAL, private=True), Param("class_v", Scope.LOCAL, private=True))
            if self.rank
            else (Param("class", Scope.LOCAL, private=True),)
        )
        self.params = (Param("domain", Scope.GROUP), *local, Param("held", Scope.LOCAL, trainable=False))

    def init_shared(self, n_ctx, dim, gen):
        return {"domain": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        if held is None:
            raise ValueError("SecFPP's class-level prompts need the classes the client holds")
        if self.covers_all_classes:
            held = torch.ones_like(held, dtype=torch.bool)
        c = len(held)
        if self.rank:  # U starts at zero, V random: the class-level prompt starts at zero but can move
            return {
                "class_u": torch.zeros(c, n_ctx, self.rank),
                "class_v": normal((self.rank, dim), self.settings.init_std, gen),
                "held": held.float(),
            }
        return {"class": torch.zeros(c, n_ctx, dim), "held": held.float()}

    def class_level(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, C, M, D]``: every class's class-level prompt (zero for classes the client lacks)."""
        cls = params["class_u"] @ params["class_v"][:, None] if self.rank else params["class"]
        return cls * params["held"][:, :, None, None]

    def views(self, params, gens):
        domain = leaf(params["domain"])
        if self.rank:
            u, v = leaf(params["class_u"]), leaf(params["class_v"])
            cls = (u @ v[:, None]) * params["held"][:, :, None, None]
            leaves = {"domain": domain, "class_u": u, "class_v": v}
        else:
            raw = leaf(params["class"])
            cls = raw * params["held"][:, :, None, None]
            leaves = {"domain": domain, "class": raw}
        return Views(leaves, domain[:, None] + cls)

    def cluster_row(self, local: dict[str, torch.Tensor], data, row: int, client: int) -> np.ndarray:
        """Client ``client``'s vector for SecPC, computed from its own state (``local``: the hosted rows,
        its at ``row``): its mean image feature, or its personalized prompt (the mean class-level prompt
        over the classes it holds)."""
        if self.cluster_on == "images":
            ix = data.clients[client].to(data.device)
            return data.features[ix].mean(0).double().cpu().numpy()
        with torch.no_grad():
            mine = {k: v[row : row + 1] for k, v in local.items()}
            cls = self.class_level(mine)
            held = mine["held"].clamp(min=0)
            mean = cls.sum(1) / held.sum(1).clamp(min=1)[:, None, None]
        return mean.flatten(1)[0].double().cpu().numpy()

    def public_facts(self) -> tuple[str, ...]:
        if self.covers_all_classes:
            return ()
        return (
            "each client's label set: class-level prompts exist for its held classes only (secfpp.public_label_set)",
        )

    def server_phases(self) -> list:
        if self.secure_clustering is None:
            return []
        return [SecPCPhase(self, secure=self.secure_clustering, every=self.every, settings=self.secpc)]

    def client_handlers(self) -> dict:
        return {} if self.secure_clustering is None else {SECPC: answer_secpc}


class SecFPPPlain(SecFPP):
    """SecFPP with the same clustering computed in the clear (an ablation: what security costs)."""

    name = "secfpp-plain"
    secure_clustering = False


class SecFPPGlobal(SecFPP):
    """SecFPP without clustering: one global domain prompt (an ablation: what clustering adds)."""

    name = "secfpp-global"
    secure_clustering = None


class SecFPPClientPrompt(SecFPP):
    """Ablation of pfpl's reading of "class-level": one local prompt per client (shared by all its
    classes) instead of one offset per held class. Its structure does not depend on the label set,
    so a private run needs no every-class rows."""

    name = "secfpp-client"

    def __init__(self, settings=None):
        super().__init__(settings)
        self.params = (Param("domain", Scope.GROUP), Param("client", Scope.LOCAL, private=True))

    def init_local(self, n_ctx, dim, gen, held=None):
        return {"client": torch.zeros(n_ctx, dim)}  # starts at the domain prompt

    def class_level(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["client"][:, None]  # [B, 1, M, D]: the same for every class

    def views(self, params, gens):
        domain, own = leaf(params["domain"]), leaf(params["client"])
        return Views({"domain": domain, "client": own}, domain + own)

    def cluster_row(self, local: dict[str, torch.Tensor], data, row: int, client: int) -> np.ndarray:
        if self.cluster_on == "images":
            return super().cluster_row(local, data, row, client)
        return local["client"][row].flatten().double().cpu().numpy()

    def public_facts(self) -> tuple[str, ...]:
        return ()


SECPC = "secpc"  # the kind of a clustering's requests to the clients (Transport.ask)


def round_settings(settings: SecPCSettings, round_index: int) -> SecPCSettings:
    """The clustering of round ``round_index``: fresh public random starts (both sides derive it)."""
    return replace(settings, seed=settings.seed + round_index)


def answer_secpc(host, client: int, request: dict) -> dict:
    """A client's side of a clustering, on whichever party hosts it: ``plain`` sends its vector (the
    ablation, in the clear); ``keys`` starts its SecPC state machine on its own vector (what it keeps
    lives with its host until the next clustering), the later phases continue it."""
    method: SecFPP = host.method
    request = dict(request)
    phase, round_index = request.pop("phase", None), request.pop("round", None)
    if not isinstance(phase, str) or not isinstance(round_index, int) or isinstance(round_index, bool):
        raise ProtocolError("a clustering request names its phase (a string) and round (an integer)")
    mine = host.phase_state.setdefault(SECPC, {})
    if phase in ("plain", "keys"):
        row = method.cluster_row(host.params, host.data, host.position[client], client)
        if phase == "plain":
            if method.secure_clustering:
                raise ProtocolError("this method clusters securely: its clients send no vector in the clear")
            return {"row": row}
        settings = round_settings(method.secpc, round_index)
        mine[client] = SecPCClient(client, row, settings, host.data.n_clients)
    if client not in mine:
        raise ProtocolError(f"client {client} has no clustering in progress (keys first)")
    return mine[client].handle(phase, request)


@dataclass
class SecPCPhase:
    """The server phase: cluster the clients every ``every`` rounds and regroup them. Each client's
    vector stays with it: SecPC's rounds are requests to the clients through the transport
    (``engine.ask``), in the simulator as over Flower; ``secpc-plain`` asks for the vectors in the
    clear. Clients the clustering could not include (they dropped, or were removed for a bad share)
    keep their group."""

    method: SecFPP
    secure: bool
    every: int
    settings: SecPCSettings
    log: list[dict] = field(default_factory=list)  # one record per clustering

    def __call__(self, engine, round_index: int) -> None:
        if round_index % self.every:  # after the first round, then every ``every`` rounds
            return
        start = time.perf_counter()
        settings = round_settings(self.settings, round_index)
        server = engine.server
        everyone = list(range(server.n_clients))
        ask = lambda phase, requests: engine.ask(
            SECPC, {c: {"phase": phase, "round": round_index, **r} for c, r in requests.items()}
        )
        if self.secure:
            result, stats = run_secpc(everyone, settings, ask)
            owners = [int(c) for c in result.clients]
        else:
            rows = {c: r["row"] for c, r in ask("plain", {c: {} for c in everyone}).items() if _vector(r)}
            owners = sorted(rows)
            result, stats = cluster(np.stack([rows[c] for c in owners]), settings, secure=False)
        groups = server.groups.detach().cpu().clone()
        k = int(result.assignment.max()) + 1
        left = [c for c in everyone if c not in set(owners)]
        groups[left] = groups[left] + k  # the others keep their groups (renumbered after the new ones)
        groups[owners] = torch.as_tensor(result.assignment, dtype=groups.dtype)
        server.regroup(torch.unique(groups, return_inverse=True)[1], torch.as_tensor(engine.sizes, dtype=torch.float))
        self.log.append(
            {
                "round": round_index + 1,
                "clusters": k,
                "iterations": result.iterations,
                "seconds": round(time.perf_counter() - start, 3),
                "assignment": result.assignment.tolist(),
                "clients": owners,
                "bytes_per_client": None if stats is None else stats.bytes_per_client,
            }
        )


def _vector(reply: dict) -> bool:
    row = reply.get("row")
    return isinstance(row, np.ndarray) and row.ndim == 1 and row.dtype.kind == "f" and bool(np.isfinite(row).all())
