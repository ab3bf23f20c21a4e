"""SecFPP: domain prompt of the client's cluster + class-level prompts of the classes it holds; the
class-level prompts never leave the client; SecPC regroups clients by their style."""

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
from pfpl.streams import Purpose, Streams, client_streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def sim(tiny, random_features, classes):
    train = random_features(tiny, 48)  # labels round-robin over 6 classes
    # client 0 holds classes {0, 1}, client 1 holds {2, 3}, client 2 holds {4, 5}
    clients = [np.flatnonzero(np.isin(train.labels.numpy(), pair)) for pair in ([0, 1], [2, 3], [4, 5])]
    method = get_method("secfpp")(MethodSettings(init_std=0.1, extra={"class_rank": 0, "recluster_every": 100}))
    settings = TrainSettings(rounds=3, local_steps=2, batch_size=8, lr=0.5, sync="fedavg", seed=2)
    return Simulator(method, PromptTower(tiny, classes, n_ctx=2), ClientData(train, clients), settings, 20.0)


def test_a_clients_context_is_its_groups_domain_prompt_plus_its_class_level_prompts(sim):
    sim.run_round()
    everyone = torch.arange(3)
    ctx = sim.personalized_context()
    assert ctx.shape == (3, 6, 2, sim.tower.backbone.ctx_dim)  # one context per class: [N, C, M, D]
    domain = sim.server.broadcast(everyone)["domain"]
    cls = sim.local["class"]
    held = sim.local["held"].bool()
    for c in range(3):
        for j in range(6):
            expected = domain[c] + (cls[c, j] if held[c, j] else 0)
            assert torch.allclose(ctx[c, j], expected, atol=1e-6)
    assert held.tolist() == [
        [True, True, False, False, False, False],
        [False, False, True, True, False, False],
        [False, False, False, False, True, True],
    ]
    assert cls[0, 2:].abs().sum() == 0 and cls[0, :2].abs().sum() > 0  # only held classes ever move


def test_one_tower_call_serves_every_clients_class_specific_contexts(sim):
    ctx = sim.personalized_context()
    together = sim.tower(ctx)
    for c in range(3):
        for j in range(6):
            alone = sim.tower(ctx[c, j][None, None].expand(1, 1, *ctx.shape[-2:]))[0, 0]
            assert torch.allclose(together[c, j], sim.tower(ctx[c : c + 1])[0, j], atol=1e-6)
            assert alone.shape == together[c, j].shape


def test_only_the_domain_prompt_travels(sim):
    everyone = torch.arange(3)
    state = sim._gather(everyone)
    batches = sim.data.batches(everyone, 2, 8, "shuffle", Streams(2), 0)
    upload = sim.update(sim.server.broadcast(everyone), state, batches, sim.sizes, 0, 0, sim.streams)
    assert set(upload.values) == {"domain"}
    assert set(sim.method.shared_params) == {"domain"}
    assert "class" in sim.method.local_params and "held" not in sim.method.trainable_local


def test_low_rank_class_level_prompts():
    method = get_method("secfpp")(MethodSettings(init_std=0.1, extra={"class_rank": 2}))
    params = method.init_local(4, 8, torch.Generator().manual_seed(0), torch.tensor([True, False, True]))
    assert params["class_u"].shape == (3, 4, 2) and params["class_v"].shape == (2, 8)
    assert params["class_u"].abs().sum() == 0  # starts at zero, so the first context is the domain prompt alone
    views = method.views(
        {"domain": torch.zeros(1, 4, 8), **{k: v[None] for k, v in params.items()}},
        client_streams(0, Purpose.FACTORIZATION, [0]),
    )
    assert views.ctx.shape == (1, 3, 4, 8) and set(views.leaves) == {"domain", "class_u", "class_v"}


def test_secure_and_plaintext_clustering_regroup_clients_by_style(tmp_path):
    """A tiny domain_class run: SecPC (secure) and its plaintext reference find the same groups, and the
    groups are the clients' styles."""
    from pfpl.config import load_config
    from pfpl.federation.runner import run

    cfg = load_config(
        None,
        [
            "federation.n_clients=10",
            "federation.partition='domain_class'",
            "federation.rounds=2",
            "federation.local_steps=1",
            "federation.batch_size=8",
            "data.train_per_class_domain=1",
            "data.val_per_class_domain=1",
            "data.test_per_class_domain=1",
            "train.methods=['secfpp', 'secfpp-plain']",
            "secfpp.recluster_every=1",
            "secfpp.split_threshold=0.2",
            "prompt.n_ctx=2",
            "train.rank=1",
            f"cache_dir='{tmp_path / 'cache'}'",
        ],
    )
    summary = run(cfg, tmp_path / "run")
    secure, plain = summary["methods"]["secfpp"], summary["methods"]["secfpp-plain"]
    assert [x["assignment"] for x in secure["clustering"]] == [x["assignment"] for x in plain["clustering"]]
    assert secure["ari"] >= 0.9 and secure["groups"] == 5
    assert secure["clustering"][0]["bytes_per_client"] > 0 and plain["clustering"][0]["bytes_per_client"] is None


def test_too_few_clients_for_the_secure_clustering_is_refused_before_any_work():
    from pfpl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"at least 2·\(K \+ T − 1\) \+ 1 = 5 clients"):
        load_config(None, ["train.methods=['secfpp']", "federation.n_clients=4"])
    load_config(None, ["train.methods=['secfpp-global']", "federation.n_clients=4"])  # no clustering: fine
    load_config(None, ["train.methods=['secfpp']", "federation.n_clients=4", "secfpp.lcc_slices=1"])  # 3 suffice


def test_the_one_prompt_per_client_ablation_adds_the_same_offset_to_every_class(tiny, random_features, classes):
    train = random_features(tiny, 48)
    clients = [np.flatnonzero(np.isin(train.labels.numpy(), pair)) for pair in ([0, 1], [2, 3], [4, 5])]
    method = get_method("secfpp-client")(MethodSettings(init_std=0.1, extra={"recluster_every": 100}))
    settings = TrainSettings(rounds=3, local_steps=2, batch_size=8, lr=0.5, sync="fedavg", seed=2)
    sim = Simulator(method, PromptTower(tiny, classes, n_ctx=2), ClientData(train, clients), settings, 20.0)
    sim.run_round()
    ctx = sim.personalized_context()
    assert ctx.shape == (3, 2, tiny.ctx_dim)  # one context per client, shared by its classes
    domain = sim.server.broadcast(torch.arange(3))["domain"]
    assert torch.allclose(ctx, domain + sim.local["client"], atol=1e-6)
    assert sim.local["client"].abs().sum() > 0 and set(method.shared_params) == {"domain"}
    assert method.public_facts() == ()  # its shape does not depend on the label set
