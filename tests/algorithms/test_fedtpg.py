"""FedTPG: a shared generator maps class-name embeddings to contexts, so a prompt exists (and was shaped
by training) for a class no client holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfpl.algorithms import get_method
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import TrainSettings
from pfpl.federation.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_it_generates_a_trained_prompt_for_classes_no_client_holds(tiny, random_features, classes):
    train = random_features(tiny, 48)
    labels = train.labels.numpy()
    # clients hold classes 0–3 only; 4 and 5 ("red cross", "blue square") are novel to every client
    clients = [np.flatnonzero(np.isin(labels, pair)) for pair in ([0, 1], [2, 3])]
    method = get_method("fedtpg")(MethodSettings(init_std=0.1, extra={"text_dim": 32}))
    settings = TrainSettings(rounds=2, local_steps=3, batch_size=8, lr=0.5, sync="fedavg", seed=3)
    sim = Simulator(method, PromptTower(tiny, classes, n_ctx=2), ClientData(train, clients), settings, 20.0)
    before = sim.personalized_context()
    for _ in range(2):
        sim.run_round()
    ctx = sim.personalized_context()  # [N, C, M, D]: one context per class, novel ones included
    assert ctx.shape == (2, 6, 2, tiny.ctx_dim)
    assert torch.allclose(ctx[0], ctx[1])  # the generator is shared: every client releases the same prompts
    novel = ctx[0, 4:]
    assert not torch.allclose(novel[0], novel[1], atol=1e-4)  # conditioned on the class name
    assert (novel - before[0, 4:]).abs().max() > 1e-4  # training on base classes moved the novel prompts
    # a class name outside the run's list gets a prompt from the same generator
    names = tiny.encode_text(["purple hexagon."]).float()
    fresh = method.generate_for({k: v for k, v in sim.server.shared.items()}, names)
    assert fresh.shape == (1, 1, 2, tiny.ctx_dim) and torch.isfinite(fresh).all()
    features = PromptTower(tiny, ["purple hexagon"], n_ctx=2)(fresh)
    assert features.shape == (1, 1, tiny.encode_text(["x"]).shape[-1]) and torch.isfinite(features).all()
