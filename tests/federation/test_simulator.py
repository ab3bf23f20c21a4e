import numpy as np
import pytest
import torch

from pfpl.algorithms import methods as M
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.prompts.factorization import orthonormalise
from pfpl.federation.simulator import EngineSettings, Simulator, VectorSGD, batch_gradients

from conftest import CLASSES, random_train_features


@pytest.fixture
def world(tiny):
    train = random_train_features(tiny, 60)
    clients = [np.arange(0, 20), np.arange(20, 45), np.arange(45, 60)]
    tower = PromptTower(tiny, CLASSES, n_ctx=4)
    reference = tiny.encode_text([f"a photo of a {c}." for c in CLASSES])
    return tower, train, clients, reference


def _fixed_factorize(monkeypatch):
    """Per-client random starts that do not depend on how clients are batched."""

    def fixed(p, rank, gen):
        starts = torch.stack([torch.randn(p.shape[-1], rank, generator=torch.Generator().manual_seed(0))
                              for _ in range(p.shape[0])])
        u = orthonormalise(p @ starts)
        v = orthonormalise(p.transpose(-1, -2) @ u).transpose(-1, -2)
        return u, v, p - u @ v

    monkeypatch.setattr(M, "factorize", fixed)


def _sim(world, name, **kw):
    tower, train, clients, reference = world
    settings = EngineSettings(**{"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 3, **kw})
    method = M.METHODS[name](MethodSettings(rank=2, init_std=0.1))
    sim = Simulator(method, tower, train, clients, settings, scale=20.0, reference=reference)
    for k in sim.params:  # move away from the tiny init so every term matters
        sim.params[k] = sim.params[k] * 5
    return sim


@pytest.mark.parametrize("name", list(M.METHODS))
def test_vectorized_step_equals_loop_over_clients(world, name, monkeypatch):
    _fixed_factorize(monkeypatch)
    sim = _sim(world, name)
    active = torch.arange(sim.n_clients)
    x, y, mask = sim.batches(0, active)[0]
    gen = torch.Generator()
    views = sim.method.views(sim._slice(active, None), gen)
    grads, loss = batch_gradients(sim, views, sim.tower(views.ctx[:, None]), x, y, mask)
    vectorized = sim.method.param_grads(views, grads)
    for c in range(sim.n_clients):
        one = torch.tensor([c])
        v1 = sim.method.views(sim._slice(one, None), gen)
        g1, l1 = batch_gradients(sim, v1, sim.tower(v1.ctx[:, None]), x[c:c + 1], y[c:c + 1], mask[c:c + 1])
        loop = sim.method.param_grads(v1, g1)
        assert torch.allclose(l1, loss[c:c + 1], atol=1e-6)
        for key in vectorized:
            assert torch.allclose(vectorized[key][c], loop[key][0], atol=1e-6), (name, key, c)


@pytest.mark.parametrize("sync", ["step", "fedavg"])
@pytest.mark.parametrize("name", ["fedotp", "dpfpl"])
def test_round_equals_per_client_loop(world, name, sync, monkeypatch):
    """A whole round of the engine equals clients trained one after another with their own optimizers."""
    _fixed_factorize(monkeypatch)
    sim = _sim(world, name, sync=sync, weight_decay=0.0)
    start = {k: v.clone() for k, v in sim.params.items()}
    batches = sim.batches(0, torch.arange(sim.n_clients))
    sim.run_round()
    lr, mom = sim.lr(0), sim.s.momentum
    weights = sim.sizes / sim.sizes.sum()
    glob = start["global"].clone()
    local = start["local"].clone()
    copies = [glob.clone() for _ in range(sim.n_clients)]
    bufs_l = [torch.zeros_like(local[0]) for _ in range(sim.n_clients)]
    bufs_g = [torch.zeros_like(glob) for _ in range(sim.n_clients)]
    server_buf = torch.zeros_like(glob)
    for x, y, mask in batches:
        global_grads = []
        for c in range(sim.n_clients):
            g_in = copies[c] if sync == "fedavg" else glob
            v = sim.method.views({"global": g_in[None], "local": local[c:c + 1]}, torch.Generator())
            g, _ = batch_gradients(sim, v, sim.tower(v.ctx[:, None]), x[c:c + 1], y[c:c + 1], mask[c:c + 1])
            pg = sim.method.param_grads(v, g)
            bufs_l[c] = mom * bufs_l[c] + pg["local"][0]
            local[c] = local[c] - lr * bufs_l[c]
            if sync == "fedavg":
                bufs_g[c] = mom * bufs_g[c] + pg["global"][0]
                copies[c] = copies[c] - lr * bufs_g[c]
            else:
                global_grads.append(pg["global"][0])
        if sync == "step":
            avg = sum(w * g for w, g in zip(weights, global_grads))
            server_buf = mom * server_buf + avg
            glob = glob - lr * server_buf
    if sync == "fedavg":
        glob = glob + sum(w * (cp - glob) for w, cp in zip(weights, copies))
    assert torch.allclose(sim.params["local"], local, atol=1e-6)
    assert torch.allclose(sim.params["global"], glob, atol=1e-6)


def test_dpfpl_forward_is_global_plus_local(world):
    sim = _sim(world, "dpfpl")
    views = sim.method.views(sim._slice(torch.arange(3), None), torch.Generator().manual_seed(1))
    assert torch.allclose(views.ctx, sim.params["global"] + sim.params["local"], atol=1e-6)
    lora = _sim(world, "dplora")
    lv = lora.method.views(lora._slice(torch.arange(3), None), torch.Generator().manual_seed(1))
    assert not torch.allclose(lv.ctx, lora.params["global"] + lora.params["local"], atol=1e-3)


def test_non_participants_do_not_move(world):
    sim = _sim(world, "fedotp", participation=0.34)
    before = sim.params["local"].clone()
    active = sim.participants(0)
    assert len(active) == 1
    sim.run_round()
    idle = [c for c in range(3) if c not in active.tolist()]
    assert torch.equal(sim.params["local"][idle], before[idle])
    assert not torch.equal(sim.params["local"][active], before[active])
    assert torch.equal(sim.opt.buffers["local"][idle], torch.zeros_like(before[idle]))


def test_promptfl_shares_one_prompt_and_coop_shares_none(world):
    promptfl, coop = _sim(world, "promptfl"), _sim(world, "coop")
    promptfl.run_round()
    coop.run_round()
    ctx = promptfl.personalized_context()
    assert torch.equal(ctx[0], ctx[1]) and torch.equal(ctx[1], ctx[2])
    assert "global" not in coop.params and coop.personalized_context().shape[0] == 3


def test_training_reduces_the_loss(world):
    sim = _sim(world, "coop", rounds=8, lr=0.05)
    losses = [sim.run_round()["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05


def test_same_seed_same_result_and_state_roundtrip(world):
    a, b = _sim(world, "fedpgp"), _sim(world, "fedpgp")
    a.run_round()
    b.load_state_dict(a.state_dict())
    a.run_round()
    b.run_round()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])


def test_vector_sgd_rows_move_independently():
    opt = VectorSGD(momentum=0.9, weight_decay=0.0)
    p = torch.zeros(4, 2)
    opt.step("p", p, torch.ones(2, 2), lr=1.0, index=torch.tensor([1, 3]))
    assert torch.equal(p[[0, 2]], torch.zeros(2, 2)) and torch.equal(p[[1, 3]], -torch.ones(2, 2))
    opt.step("p", p, torch.ones(1, 2), lr=1.0, index=torch.tensor([1]))
    assert torch.allclose(p[1], torch.full((2,), -2.9)) and torch.equal(p[3], -torch.ones(2))
