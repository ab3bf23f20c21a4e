"""Private runs of PromptFolio, pFedMoAP, FedTPG and FedOTP: the ε each client reports is the one an
independent dp-accounting composition of what ran gives, and the per-record gradients the mechanisms
clip are the records' own (checked against one backward pass per record)."""

from __future__ import annotations

from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator
from pfpl.privacy.mechanisms import StepLoss, head_record_gradients

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [
    "federation.n_clients=3",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "federation.sync='fedavg'",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "prompt.n_ctx=2",
    "train.pfedmoap_experts=2",
    "train.rank=1",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the features are rendered and encoded once for every case


@pytest.mark.parametrize(
    "method, mode",
    [("promptfolio", "feature"), ("pfedmoap", "feature"), ("fedtpg", "per-sample"), ("fedotp", "feature")],
)
def test_a_private_run_reports_the_epsilon_dp_accounting_gives(cache, method, mode):
    """Per-sample mode noises every leaf on the client here (FedTPG's generator is private), so no global DP."""
    from pfpl.config import load_config
    from pfpl.federation.context import Benchmark
    from pfpl.federation.report import epsilons
    from pfpl.privacy.rules import validate_dp

    sigma = 1.5
    cfg = load_config(
        None,
        [
            *SMALL,
            f"cache_dir='{cache}'",
            f"train.methods=['{method}']",
            f"dp.mode='{mode}'",
            f"dp.noise_multiplier={sigma}",
            "dp.sampling='poisson'",
            "dp.randomness='seeded'",
            *(["dp.global_dp=false"] if mode == "per-sample" else []),
        ],
    )
    validate_dp(cfg.dp, cfg.train.methods, cfg.federation)
    sim, plan = Benchmark(cfg).engine(method)
    for _ in range(cfg.federation.rounds):
        sim.run_round()
    reported = epsilons(sim, plan)
    for c, eps in enumerate(reported):
        q = min(1.0, cfg.federation.batch_size / float(sim.sizes[c]))
        steps = sim.local_steps * cfg.federation.rounds
        acc = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        truth = acc.get_epsilon(cfg.dp.delta)
        assert np.isfinite(eps) and abs(eps - truth) <= 0.02 * truth, (method, c, eps, truth)


def _per_record_by_loop(step: StepLoss) -> dict[str, torch.Tensor]:
    """Each record's gradient w.r.t. the head's inputs, one autograd call per record."""
    head, y, mask = step.head, step.batch.y, step.batch.mask
    data = {k: v.detach() for k, v in step.head_data().items()}
    out = {k: [] for k in head.inputs}
    for n in range(y.shape[1]):
        inputs = {k: v.detach().clone().requires_grad_(True) for k, v in head.inputs.items()}
        logits = head.fn(inputs, {k: v[:, n : n + 1] for k, v in data.items()})[:, 0]
        loss = (F.cross_entropy(logits, y[:, n], reduction="none") * mask[:, n]).sum()
        grads = torch.autograd.grad(loss, list(inputs.values()))
        for k, g in zip(inputs, grads):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("method", ["pfedmoap", "fedotp"])
def test_head_per_record_gradients_are_each_records_own(tiny, random_features, classes, method):
    train = random_features(tiny, 24)
    gen = torch.Generator().manual_seed(5)
    patches = F.normalize(torch.randn(24, 3, 32, generator=gen), dim=-1)
    train = replace(train, tokens=patches)
    clients = [np.arange(0, 12), np.arange(12, 24)]
    extra = {"text_dim": 32, "pfedmoap_experts": 2, "pfedmoap_gating_dim": 16, "pfedmoap_heads": 4}
    m = get_method(method)(MethodSettings(init_std=0.1, extra=extra))
    settings = TrainSettings(rounds=1, local_steps=1, batch_size=5, seed=1)
    data = ClientData(train, clients, tokens=patches)
    sim = Simulator(m, PromptTower(tiny, classes, n_ctx=2), data, settings, 20.0, phases=m.server_phases())
    sim.run_round()  # pFedMoAP: the experts are downloaded
    ids = torch.arange(2)
    state = sim._gather(ids)
    batch = sim._batches(ids, 1)[0]
    views = m.views({**sim.server.broadcast(ids), **state.params}, [torch.Generator() for _ in range(2)])
    text = m.text_features(sim.tower, views)
    step = StepLoss(views.leaves, text, batch, 20.0, head=m.head(views, text, batch))
    got, expected = head_record_gradients(step), _per_record_by_loop(step)
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
        assert got[k].abs().sum() > 0
