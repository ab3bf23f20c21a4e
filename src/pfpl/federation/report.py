"""What a run reports of one method: the headline accuracies, the privacy record (ε per client, its
kind and whether it is formal), the released prompts, SecFPP's grouping and FedSP's auxiliary-model
figures — the same fields whichever transport trained it."""

from __future__ import annotations

import math

import numpy as np
import torch

from pfpl.algorithms import spec
from pfpl.artifacts import ReleasedPrompts
from pfpl.evaluation import SCORES
from pfpl.evaluation.federated import evaluate_clients
from pfpl.privacy.accounting import Accountant
from pfpl.privacy.plan import PrivacyPlan


def finite(value: float) -> float | None:
    """ε for JSON: ``None`` stands for ∞ (no privacy)."""
    return None if math.isinf(value) else float(value)


HEADLINE = SCORES


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def headline(result: dict) -> dict:
    """The mean ± std of every accuracy the evaluation plan has."""
    return {k: result[k] for key in HEADLINE for k in (key, f"{key}_std") if k in result}


def auxiliary(sim, bench, name: str) -> dict:
    """For FedSP: each client's own product (its auxiliary model, body and prompt), the model owner's
    figures (parameters a client holds, distillation, the auxiliary model alone) and the bytes sent."""
    if not spec(name).auxiliary:
        return {}
    context = bench.fedsp(sim.method.distilled)
    everyone = torch.arange(sim.n_clients)
    params = {**sim.server.broadcast(everyone), **sim.local}
    aux = evaluate_clients(sim.method.auxiliary_features(sim.tower, params), context.test, bench.plan)
    return fedsp_record(aux, context, sim.method, sim.server.shared["prompt"][0].numel())


def fedsp_record(aux: dict, context, method, prompt_numel: int) -> dict:
    """FedSP's summary entries from its clients' own products' scores ``aux`` (evaluate_clients'
    form): the headline, the model owner's figures and the bytes sent — in-process or on Flower."""
    prompt = prompt_numel * 4
    body = sum(v.numel() * 4 for v in context.body.values())
    up = prompt + (body if method.upload == "reference" else 0)
    return {
        "auxiliary": headline(aux),
        "fedsp": {
            **context.report,
            "bytes_per_round": {"download": prompt, "upload": up, "body_once": body, "upload_mode": method.upload},
        },
    }


def group_prompt(sim, bench, name: str) -> dict:
    """For a method whose shared part is one prompt ``[G, M, D]`` (the global or group/domain prompt;
    not FedSP, whose tower differs): every client's scores with its group's prompt alone, without
    its local part — SecFPP's domain-prompt view beside the released personal prompt. Final round,
    in-process runs."""
    if spec(name).auxiliary:
        return {}
    shared = sim.server.broadcast(torch.arange(sim.n_clients))
    if len(shared) != 1:
        return {}
    (ctx,) = shared.values()
    if ctx.dim() != 3:
        return {}
    with torch.no_grad():
        text = sim.tower(ctx[:, None].to(bench.device))
    return {"group_prompt": headline(bench.evaluate(text))}


def grouping(sim, bench) -> dict:
    """For a method whose server regroups clients: the adjusted Rand index of its final groups
    against the clients' true domains (majority domain of their records), and the clustering log."""
    clustering = [phase for phase in sim.phases if hasattr(phase, "log")]
    if not clustering:
        return {}
    logs = [entry for phase in clustering for entry in phase.log]
    from pfpl.secure.secpc import adjusted_rand_index

    domains = bench.train.domains.numpy()
    truth = [int(np.bincount(domains[ix]).argmax()) for ix in bench.partition.clients]
    return {
        "ari": adjusted_rand_index(sim.server.groups.cpu().numpy(), np.asarray(truth)),
        "groups": int(sim.server.n_groups),
        "clustering": logs,
    }


def released(sim, clients: list) -> ReleasedPrompts:
    """Every client's released prompt (and vision prompts, kept so the run folder can export them)."""
    vision = sim.vision_prompts()
    return ReleasedPrompts(
        context=sim.personalized_context().cpu(),
        shared={k: v.cpu() for k, v in sim.server.shared.items()},
        groups=sim.server.groups.cpu(),
        local={k: v.cpu() for k, v in sim.local.items()},
        clients=[torch.as_tensor(ix) for ix in clients],
        vision=None if vision is None else vision.cpu(),
    )


def epsilons(sim, plan: PrivacyPlan) -> list[float]:
    """Every client's ε(δ) for its released prompt, from its own accountant (a simulator's clients)."""
    return [plan.client_epsilon(sim.ledgers[c], int(sim.participations[c])) for c in range(sim.n_clients)]


def privacy_record(plan: PrivacyPlan, eps: list[float], client_level: Accountant) -> dict:
    """ε fields of a metrics row or a method's summary (``None`` stands for ∞), from every client's ε
    (however the transport learned it) and the federation's client-level accountant."""
    client_level = client_level.epsilon(plan.delta) if plan.client_sigma > 0 else None
    return {
        "epsilon": finite(max(eps)),
        "epsilon_per_client": [finite(e) for e in eps],
        "epsilon_kind": plan.epsilon_kind,
        "formal_guarantee": plan.formal(),
        "randomness": plan.randomness,
        "client_level_epsilon": client_level,
    }
