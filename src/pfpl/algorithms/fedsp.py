"""FedSP for CLIP (DESIGN §8): soft prompts are the only messengers between the server's private full
model and the clients' auxiliary models.

Each client holds a copy of the distilled auxiliary model (:mod:`pfpl.backbones.auxiliary`); its
text body is a local parameter that only that client trains. A round has two stages on fresh
batches: *global-model alignment* (the auxiliary text body trains, the prompt is frozen) and *local
knowledge* (the prompt trains, the body is frozen); each parameter has its own optimizer state. The
client uploads its prompt only — the published code also uploads the auxiliary body, offered here
only as the explicitly named ``fedsp.upload = "reference"``, which leaks more. The server averages
the prompts (securely, when secure aggregation is on), plugs them into the full model, fine-tunes
them for a few steps on its own data (:class:`ServerFineTune`) and broadcasts the result. The
product is the full model with the final prompt, which is what every client is evaluated with.

What is batched: one autograd graph and one optimizer step for all clients, but the text tower runs
once per client (each on its own body, through ``torch.func.functional_call``): B tower calls a
step instead of one. Variants: ``fedsp-nokd`` (the auxiliary model is not distilled),
``fedsp-noalign`` (no alignment stage: the body stays as distilled), and two controls that say where
the product comes from: ``fedsp-server-only`` (clients train nothing) and ``fedsp-clients-only`` (no
server fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfpl.algorithms.base import Method, Param, Scope, Stage, Views, leaf
from pfpl.streams import SERVER, Purpose, stream

BODY = "body:"


class FedSP(Method):
    name = "fedsp"
    align = True
    distilled = True

    def __init__(self, settings=None):
        super().__init__(settings)
        extra = self.settings.extra
        self.body: dict[str, torch.Tensor] = extra.get("fedsp_body", {})
        self.full_tower = extra.get("fedsp_full_tower")
        self.server_data = extra.get("fedsp_server_data")  # (features [n, E], labels [n]) of the full model
        self.server_steps = int(extra.get("fedsp_server_steps", 5))
        self.server_lr = float(extra.get("fedsp_server_lr", 0.02))
        self.server_batch = int(extra.get("fedsp_server_batch", 32))
        self.scale = float(extra.get("fedsp_scale", 100.0))
        self.upload = str(extra.get("fedsp_upload", "prompt"))
        # the prompt is the whole release; the body shapes it, so local DP noises both (per-sample mode)
        self.params = (
            Param("prompt", Scope.GROUP, private=True),
            *(Param(BODY + k, Scope.LOCAL, private=True) for k in self.body),
        )

    def init_shared(self, n_ctx, dim, gen):
        return {"prompt": self.start(n_ctx, dim, gen)}

    def init_local(self, n_ctx, dim, gen, held=None):
        return {BODY + k: v.detach().clone() for k, v in self.body.items()}  # the distilled body, as received

    def views(self, params, gens):
        leaves = {"prompt": leaf(params["prompt"])}
        leaves.update({n: leaf(params[n]) for n in params if n.startswith(BODY)})
        return Views(leaves, leaves["prompt"])

    def stages(self):
        body = tuple(BODY + k for k in self.body)
        prompt = Stage("local knowledge", ("prompt",))
        return (Stage("global-model alignment", body), prompt) if self.align else (prompt,)

    def text_features(self, tower, views):
        """Each client's prompt through its own auxiliary text body (one tower call per client)."""
        ctx = views.ctx
        out = []
        for b in range(ctx.shape[0]):
            params = {k: views.leaves[BODY + k][b] for k in self.body}
            out.append(tower(ctx[b : b + 1, None], params=params))
        return torch.cat(out)

    def release_features(self, tower, params, gens):
        """The server's product: the full model with the shared prompt, the same for every client."""
        features = self.full_tower(params["prompt"][:1, None].to(self.full_tower.backbone.device))
        return features.expand(params["prompt"].shape[0], *features.shape[1:])

    def auxiliary_features(self, tower, params) -> torch.Tensor:
        """``[N, C, E]``: each client's own product, its auxiliary model with its body and the prompt."""
        with torch.no_grad():
            views = Views({k: v for k, v in params.items() if k == "prompt" or k.startswith(BODY)}, params["prompt"])
            return self.text_features(tower, views)

    def upload_extras(self, local):
        if self.upload != "reference":
            return {}
        return {k: v.detach() for k, v in local.items() if k.startswith(BODY)}  # leaks the client's body

    def server_phases(self):
        return [ServerFineTune(self)] if self.server_steps > 0 and self.server_data is not None else []


class FedSPNoKD(FedSP):
    """Ablation: the auxiliary model is not distilled from the full one."""

    name = "fedsp-nokd"
    distilled = False


class FedSPNoAlign(FedSP):
    """Ablation: no global-model alignment stage (the body stays as distilled)."""

    name = "fedsp-noalign"
    align = False


class FedSPServerOnly(FedSP):
    """Control: the clients train nothing (their prompt uploads are the prompt they received), so the
    product is the server's fine-tuning on its own data alone; no distillation (no client uses the
    auxiliary model). What FedSP adds over this is what the federation adds."""

    name = "fedsp-server-only"
    distilled = False

    def stages(self):
        return (Stage("none: the server alone trains", ()),)


class FedSPClientsOnly(FedSP):
    """Control: no server fine-tuning; the product is the average of the clients' prompts, trained on
    their distilled auxiliary models, plugged into the full model."""

    name = "fedsp-clients-only"

    def server_phases(self):
        return []


@dataclass
class ServerFineTune:
    """After each round the server fine-tunes the averaged prompt on its own data with the full model
    (SGD, ``server_steps`` steps, batches from the server's own stream) before broadcasting it."""

    method: FedSP

    def __call__(self, engine, round_index: int) -> None:
        m = self.method
        features, labels = m.server_data
        prompt = engine.server.shared["prompt"]
        device = m.full_tower.backbone.device
        for g in range(prompt.shape[0]):
            ctx = prompt[g].detach().clone().to(device).requires_grad_(True)
            opt = torch.optim.SGD([ctx], lr=m.server_lr, momentum=0.9)
            gen = stream(engine.settings.seed, Purpose.BATCH_ORDER, round_index, g, SERVER, 1)
            for _ in range(m.server_steps):
                idx = torch.randint(len(labels), (min(m.server_batch, len(labels)),), generator=gen)
                text = m.full_tower(ctx[None, None])[0]
                logits = m.scale * features[idx].to(device) @ text.t()
                loss = F.cross_entropy(logits, labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                prompt[g] = ctx.detach().to(prompt.device)
