"""pFedMoAP: a local attention gate over the client's own prompt and prompts downloaded from other
clients (experts); what each client receives, and the combinations whose release cannot be accounted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.algorithms.pfedmoap import gate_weights, reduced
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.config import load_config
from pfpl.data.clients import ClientData
from pfpl.errors import ConfigError, PrivacyConfigError
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator
from pfpl.privacy.rules import validate_dp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXTRA = {"text_dim": 32, "pfedmoap_gating_dim": 16, "pfedmoap_heads": 4}


def _sim(tiny, random_features, classes, experts: int, selection: str = "nearest", rounds: int = 0):
    train = random_features(tiny, 48)
    clients = [np.flatnonzero(np.isin(train.labels.numpy(), pair)) for pair in ([0, 1], [2, 3], [4, 5])]
    extra = {**EXTRA, "pfedmoap_experts": experts, "pfedmoap_selection": selection}
    method = get_method("pfedmoap")(MethodSettings(init_std=0.1, extra=extra))
    settings = TrainSettings(rounds=3, local_steps=2, batch_size=8, lr=0.5, sync="fedavg", seed=4)
    tower, data = PromptTower(tiny, classes, n_ctx=2), ClientData(train, clients)
    sim = Simulator(method, tower, data, settings, 20.0, phases=method.server_phases())
    for _ in range(rounds):
        sim.run_round()
    return sim


def test_gate_weights_sum_to_one_and_leave_out_experts_not_downloaded():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 3, 4, 8, generator=gen)
    present = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    w = gate_weights(q, k, present, heads=2, scaling=10.0)  # [B, n, C, h, K]
    assert w.shape == (2, 5, 4, 2, 3)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5, 4, 2), atol=1e-6)
    assert (w >= 0).all() and w[1, ..., 1].abs().max() == 0 and w[0, ..., 1].min() > 0


def test_a_single_expert_reduces_it_to_the_local_prompt(tiny, random_features, classes):
    """K = 1 (only the client's own prompt): the attention weight is 1, so the gated feature is the local
    prompt's reduced feature through the gate's value and output maps (identity at the start), and the
    logits are λ·s·x·T_local + s·x̃·x̃(T_local). Two runs whose downloaded experts differ but are all
    absent give the same classifier."""
    sim = _sim(tiny, random_features, classes, experts=1)
    method, params = sim.method, sim.params
    gens = [torch.Generator() for _ in range(3)]
    classifier = method.release_features(sim.tower, params, gens)
    x = torch.nn.functional.normalize(torch.randn(7, tiny.encode_text(["x"]).shape[-1]), dim=-1)

    class Test:  # the records a released classifier is scored on
        features = x

    stride, d, _ = method.gate_shape()
    text = sim.tower(params["prompt"][:, None])
    lam, s = method.setting("pfedmoap_lambda"), method.scale
    for row in range(3):
        got = classifier[row].scores(Test, torch.arange(7))
        px, pt = reduced(x, stride, d), reduced(text[row], stride, d)
        expected = lam * s * x @ text[row].t() + s * px @ pt.t()
        assert torch.allclose(got, expected, atol=1e-4)
    # the same with K = 3 before any download: absent experts do not count
    sim3 = _sim(tiny, random_features, classes, experts=3)
    sim3.local["prompt"] = params["prompt"].clone()
    sim3.local["expert_features"] = torch.randn_like(sim3.local["expert_features"])  # garbage, but absent
    three = sim3.method.release_features(sim3.tower, sim3.params, gens)
    assert torch.allclose(
        three[0].scores(Test, torch.arange(7)), classifier[0].scores(Test, torch.arange(7)), atol=1e-4
    )


def test_each_client_downloads_the_nearest_other_prompts_and_restarts_from_the_mean(tiny, random_features, classes):
    sim = _sim(tiny, random_features, classes, experts=2, rounds=1)
    local = sim.local
    prompts = local["prompt"]
    assert (local["present"] == 1).all() and (local["fresh"] == 1).all()
    for c in range(3):
        others = [j for j in range(3) if j != c]
        dist = [float((prompts[j] - prompts[c]).pow(2).sum()) for j in others]
        nearest = others[int(np.argmin(dist))]
        assert torch.allclose(local["experts"][c, 0], prompts[nearest])  # another client's prompt, never its own
        assert torch.allclose(local["expert_features"][c, 0], sim.tower(prompts[nearest][None, None])[0], atol=1e-5)
    sizes = torch.tensor([float(s) for s in sim.sizes])
    mean = (prompts * (sizes / sizes.sum())[:, None, None]).sum(0)
    assert torch.allclose(local["start"][0], mean, atol=1e-5)
    sim.run_round()  # the next round starts every prompt from the mean, then trains it
    assert (sim.local["fresh"] == 1).all()  # a new download arrived after it


def test_random_selection_draws_other_clients(tiny, random_features, classes):
    sim = _sim(tiny, random_features, classes, experts=3, selection="random", rounds=1)
    for c in range(3):
        got = {
            j
            for j in range(3)
            if any(torch.equal(sim.local["experts"][c, i], sim.local["prompt"][j]) for i in range(2))
        }
        assert got == {j for j in range(3) if j != c}


def test_unaccountable_combinations_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="secure aggregation"):
        load_config(None, ["train.methods=['pfedmoap']", "federation.secure_aggregation=true"])
    cfg = load_config(None, ["train.methods=['pfedmoap']", "dp.mode=feature", "dp.noise_multiplier=1.0"])
    validate_dp(cfg.dp, cfg.train.methods, cfg.federation)  # sample-level DP covers every prompt it sends
    cfg = load_config(None, ["train.methods=['pfedmoap']", "dp.client_noise_multiplier=1.0", "dp.client_clip=1.0"])
    with pytest.raises(PrivacyConfigError, match="client-level DP cannot be accounted for pfedmoap"):
        validate_dp(cfg.dp, cfg.train.methods, cfg.federation)
    with pytest.raises(ConfigError, match="clip_quantile"):
        load_config(
            None, ["train.methods=['pfedmoap']", "dp.mode=feature", "dp.target_epsilon=1", "dp.clip_quantile=0.5"]
        )
