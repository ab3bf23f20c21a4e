"""pFedMoAP (Luo et al., ICLR 2025): personalized federated mixture of adaptive prompts.

Each client keeps a prompt and a local attention gate. After every round the server collects the
clients' prompts and sends each client ``K − 1`` of the *other* clients' prompts as fixed, non-local
experts (the nearest ones by L2 distance to its own, or a random choice: ``train.pfedmoap_selection``),
and the participants' size-weighted mean prompt, from which the client's prompt restarts at its next
round (the public code's download). The gate attends from the image feature (query) to the class
text features of the K experts (keys and values: the client's own prompt first, then the downloaded
ones), in a reduced space (every ``E // d``-th feature dimension, d = 128) with ``h`` heads and the
public code's dot-product scaling (10); its output is a gated class feature per image, and

    logits = λ · s · x·T_local + s · x̃·gate(x̃, T_experts)     (x̃: the reduced image feature)

with λ = 0.5. With one expert (K = 1, or before any download) the attention weight is 1 and the
gate is a linear map of the local prompt's features alone.

What each client receives, and what that means for privacy: its experts are other clients' prompts,
i.e. their releases. In a private run (``dp.mode`` feature or per-sample: every trainable local part
— prompt and gate — is covered by the client's sample-level DP) a downloaded prompt is post-processing
of its owner's DP release, so a client's ε covers its own records and another client's records are
protected in it by that client's ε. The server sees every client's prompt individually (that is the
method): secure aggregation, which reveals only sums, cannot hide them and is refused, and so is
client-level DP (nothing is aggregated for it to noise). The released classifier is a gate over
several prompts, not one context (``Spec.one_context = False``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pfpl.algorithms.base import Classifier, Method, Param, Scope, Views, leaf
from pfpl.errors import ProtocolError
from pfpl.privacy.mechanisms import Head
from pfpl.streams import Purpose, stream

GATE = ("w_q", "w_k", "w_v", "w_o")
EXPERTS = "pfedmoap"  # the kind of the experts phase's requests to the clients (Transport.ask)
DEFAULTS = {
    "pfedmoap_experts": 10,
    "pfedmoap_selection": "nearest",
    "pfedmoap_lambda": 0.5,
    "pfedmoap_gating_dim": 128,
    "pfedmoap_heads": 8,
    "pfedmoap_scaling": 10.0,
}


def reduced(x: torch.Tensor, stride: int, d: int) -> torch.Tensor:
    """pFedMoAP's reduction of a feature to the gate's space: every ``stride``-th dimension, ``d`` of them."""
    return x[..., ::stride][..., :d]


def gate_weights(q: torch.Tensor, k: torch.Tensor, present: torch.Tensor, heads: int, scaling: float) -> torch.Tensor:
    """``[B, n, C, h, K]`` attention weights of images ``q`` ``[B, n, d]`` over the experts' class features
    ``k`` ``[B, K, C, d]`` (both already projected); ``present`` ``[B, K]`` masks experts not downloaded."""
    b, n, d = q.shape
    kk, c = k.shape[1], k.shape[2]
    att = scaling * torch.einsum(
        "bnhe,bkche->bnchk", q.reshape(b, n, heads, d // heads), k.reshape(b, kk, c, heads, d // heads)
    )
    att = att.masked_fill(present[:, None, None, None, :] <= 0, float("-inf"))
    return torch.softmax(att, dim=-1)


class PFedMoAP(Method):
    name = "pfedmoap"
    params = (
        Param("prompt", Scope.LOCAL, private=True),
        *(Param(n, Scope.LOCAL, private=True) for n in GATE),
        Param("experts", Scope.LOCAL, trainable=False),  # [K-1, M, D] other clients' prompts
        # [K-1, C, E] their class text features, computed once per download (constants of a round)
        Param("expert_features", Scope.LOCAL, trainable=False),
        Param("present", Scope.LOCAL, trainable=False),  # [K-1] 1 where an expert was downloaded
        Param("start", Scope.LOCAL, trainable=False),  # [M, D] the mean prompt the next round starts from
        Param("fresh", Scope.LOCAL, trainable=False),  # [1] 1 when ``start`` arrived after the last round
    )

    def setting(self, key: str):
        return self.settings.extra.get(key, DEFAULTS[key])

    # ---- the gate's shape ------------------------------------------------------------------------
    def gate_shape(self) -> tuple[int, int, int]:
        """(stride, d, heads) of the gate's reduced space for the text tower's feature width."""
        e = self.settings.extra.get("text_dim")
        if e is None:
            raise ValueError("pFedMoAP needs the text tower's feature width (MethodSettings.extra['text_dim'])")
        stride = max(1, int(e) // int(self.setting("pfedmoap_gating_dim")))
        d = len(range(0, int(e), stride))
        d = min(d, int(self.setting("pfedmoap_gating_dim")))
        return stride, d, math.gcd(int(self.setting("pfedmoap_heads")), d)

    @property
    def n_experts(self) -> int:
        """K: the experts a client's gate mixes, its own prompt included."""
        return int(self.setting("pfedmoap_experts"))

    # ---- parameters ------------------------------------------------------------------------------
    def init_shared(self, n_ctx, dim, gen):
        return {}

    def init_local(self, n_ctx, dim, gen, held=None):
        _, d, _ = self.gate_shape()
        k = self.n_experts - 1
        return {
            "prompt": self.start(n_ctx, dim, gen),
            **{n: torch.eye(d) for n in GATE},  # the gate starts as plain attention in the reduced space
            "experts": torch.zeros(k, n_ctx, dim),
            "expert_features": torch.zeros(k, 0 if held is None else len(held), int(self.settings.extra["text_dim"])),
            "present": torch.zeros(k),
            "start": torch.zeros(n_ctx, dim),
            "fresh": torch.zeros(1),
        }

    def begin_round(self, local):
        fresh = local["fresh"][:, 0] > 0.5
        if bool(fresh.any()):
            local["prompt"][fresh] = local["start"][fresh]
            local["fresh"][fresh] = 0

    def views(self, params, gens):
        leaves = {n: leaf(params[n]) for n in ("prompt", *GATE)}
        aux = {"expert_features": params["expert_features"].detach(), "present": params["present"].detach()}
        return Views(leaves, leaves["prompt"], aux=aux)

    # ---- the classifier --------------------------------------------------------------------------
    def prepare(self, tower):
        self.scale = float(tower.backbone.logit_scale)
        if "text_dim" not in self.settings.extra:  # built without the run's settings (a bare MethodSettings)
            with torch.no_grad():
                self.settings.extra["text_dim"] = int(tower.backbone.encode_text(["x"]).shape[-1])

    def text_features(self, tower, views):
        return tower(views.ctx[:, None])  # [B, C, E]; the experts' are in views.aux (fixed, non-local)

    def head(self, views, text_features, batch):
        inputs = {"text": text_features, **{n: views.leaves[n] for n in GATE}}
        experts, present = views.aux["expert_features"], views.aux["present"]
        return Head(inputs, lambda inp, data: self.logits(inp, data["x"], experts, present))

    def logits(
        self, inputs: dict[str, torch.Tensor], x: torch.Tensor, experts: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """``[B, n, C]`` logits of images ``x`` ``[B, n, E]`` at the backbone's logit scale."""
        stride, d, heads = self.gate_shape()
        scale = getattr(self, "scale", 1.0)
        text = inputs["text"]
        local = scale * torch.einsum("bne,bce->bnc", x, text)
        keys = reduced(torch.cat([text[:, None], experts.to(text)], dim=1), stride, d)  # [B, K, C, d]
        mask = torch.cat([present.new_ones(present.shape[0], 1), present], dim=1).to(text)  # [B, K]
        px = reduced(x, stride, d)
        q = torch.einsum("bnd,bde->bne", px, inputs["w_q"])
        k = torch.einsum("bkcd,bde->bkce", keys, inputs["w_k"])
        v = torch.einsum("bkcd,bde->bkce", keys, inputs["w_v"])
        w = gate_weights(q, k, mask, heads, float(self.setting("pfedmoap_scaling")))
        b, kk, c = v.shape[:3]
        mixed = torch.einsum("bnchk,bkche->bnche", w, v.reshape(b, kk, c, heads, d // heads)).reshape(*w.shape[:3], d)
        gated = torch.einsum("bncd,bde->bnce", mixed, inputs["w_o"])
        return float(self.setting("pfedmoap_lambda")) * local + scale * torch.einsum("bnd,bncd->bnc", px, gated)

    def release_features(self, tower, params, gens):
        with torch.no_grad():
            views = self.views(params, gens)
            text = self.text_features(tower, views)
            inputs = {"text": text, **{n: views.leaves[n].detach() for n in GATE}}
            experts, present = views.aux["expert_features"], views.aux["present"]

        def scores(row, features, index):
            with torch.no_grad():
                x = features.features[index.to(features.features.device)].to(text)[None]
                one = {k: v[row : row + 1] for k, v in inputs.items()}
                return self.logits(one, x, experts[row : row + 1], present[row : row + 1])[0]

        return Classifier(scores, text.shape[0])

    def public_facts(self) -> tuple[str, ...]:
        return (
            "its classifier carries other clients' prompts (its experts), each its owner's release, protected "
            "by its owner's ε",
        )

    # ---- the experts' download (a server phase) ----------------------------------------------------
    def server_phases(self) -> list:
        return [ExpertsPhase(self)]

    def client_handlers(self) -> dict:
        return {EXPERTS: answer_experts}


def answer_experts(host, client: int, request: dict) -> dict:
    """The client side of the experts phase: send its prompt, or take its download."""
    row = host.position[client]
    kind = request.get("kind")
    params = host.params
    if kind == "prompt":
        return {"prompt": params["prompt"][row].detach().cpu().numpy()}
    if kind != "download":
        raise ProtocolError(f"an experts request of unknown kind {kind!r}")
    start = np.asarray(request.get("start"), dtype=np.float32)
    experts = np.asarray(request.get("experts"), dtype=np.float32)
    present = np.asarray(request.get("present"), dtype=np.float32)
    if start.shape != tuple(params["start"].shape[1:]) or experts.shape != tuple(params["experts"].shape[1:]):
        raise ProtocolError(f"a download of shape {start.shape} / {experts.shape} does not fit this client")
    if present.shape != tuple(params["present"].shape[1:]) or not (
        np.isfinite(start).all() and np.isfinite(experts).all()
    ):
        raise ProtocolError("a download with a wrong mask or non-finite prompts")
    device = params["start"].device
    params["start"][row] = torch.as_tensor(start, device=device)
    params["experts"][row] = torch.as_tensor(experts, device=device)
    with torch.no_grad():  # the experts' class text features, once per download
        features = host.tower(params["experts"][row][:, None]) if len(experts) else params["expert_features"][row]
    params["expert_features"][row] = features.to(params["expert_features"])
    params["present"][row] = torch.as_tensor((present > 0).astype(np.float32), device=device)
    params["fresh"][row] = 1
    return {}


class ExpertsPhase:
    """After every round: every client sends its prompt (a release); each gets ``K − 1`` of the others'
    as experts and the round's participants' size-weighted mean prompt, its next round's start."""

    def __init__(self, method: PFedMoAP):
        self.method = method

    def __call__(self, engine, round_index: int) -> None:
        n = len(engine.sizes)
        replies = engine.ask(EXPERTS, {c: {"kind": "prompt"} for c in range(n)})
        prompts: dict[int, np.ndarray] = {}
        for c, reply in replies.items():
            p = np.asarray(reply.get("prompt"), dtype=np.float32)
            if p.ndim == 2 and np.isfinite(p).all():
                prompts[int(c)] = p
        if not prompts:
            return
        shape = next(iter(prompts.values())).shape
        prompts = {c: p for c, p in prompts.items() if p.shape == shape}
        sizes = np.asarray(engine.sizes.cpu() if hasattr(engine.sizes, "cpu") else engine.sizes, dtype=np.float64)
        joined = [c for c in engine.server.participants(round_index).tolist() if c in prompts] or sorted(prompts)
        weights = sizes[joined] / sizes[joined].sum()
        mean = np.tensordot(weights, np.stack([prompts[c] for c in joined]), axes=1).astype(np.float32)
        k = self.method.n_experts - 1
        downloads = {}
        for c in range(n):
            chosen = self.choose(c, prompts, k, round_index, engine)
            experts = np.zeros((k, *shape), np.float32)
            present = np.zeros(k, np.float32)
            for i, j in enumerate(chosen):
                experts[i], present[i] = prompts[j], 1.0
            downloads[c] = {"kind": "download", "start": mean, "experts": experts, "present": present}
        engine.ask(EXPERTS, downloads)

    def choose(self, client: int, prompts: dict[int, np.ndarray], k: int, round_index: int, engine) -> list[int]:
        """The ``k`` other clients whose prompts ``client`` downloads."""
        others = [j for j in sorted(prompts) if j != client]
        if k <= 0 or not others:
            return []
        if self.method.setting("pfedmoap_selection") == "random" or client not in prompts:
            gen = stream(engine.settings.seed, Purpose.EXPERTS, round_index, 0, client)
            order = torch.randperm(len(others), generator=gen).tolist()
            return [others[i] for i in order[:k]]
        own = prompts[client].ravel()
        dist = [float(((prompts[j].ravel() - own) ** 2).sum()) for j in others]
        return [others[i] for i in np.argsort(dist, kind="stable")[:k]]
