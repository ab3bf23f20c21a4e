import numpy as np
import pytest
import torch

from pfpl.algorithms import METHOD_NAMES, get_method, prompts_vision, spec
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.data.clients import ClientData
from pfpl.federation.client import TrainSettings, sgd_step
from pfpl.federation.simulator import Simulator
from pfpl.streams import Purpose, Streams, client_streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# the tiny backbone's image tower is a ResNet: the vision-prompt methods get these checks on a ViT in
# tests/algorithms/test_vision_methods.py
# FedOTP scores by patch features, which this world has none of (tests/algorithms/test_fedotp.py)
TEXT_METHODS = [m for m in METHOD_NAMES if not prompts_vision(m) and not spec(m).patches]


@pytest.fixture
def world(tiny, random_features, classes):
    train = random_features(tiny, 60)
    clients = [np.arange(0, 20), np.arange(20, 45), np.arange(45, 60)]
    tower = PromptTower(tiny, classes, n_ctx=4)
    reference = tiny.encode_text([f"a photo of a {c}." for c in classes])
    return tower, train, clients, reference


def _sim(world, name, one_client_calls=False, **kw):
    tower, train, clients, reference = world
    settings = TrainSettings(**{"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 3, **kw})
    method = get_method(name)(MethodSettings(rank=2, init_std=0.1))
    sim = Simulator(
        method,
        tower,
        ClientData(train, clients),
        settings,
        scale=20.0,
        reference=reference,
        one_client_calls=one_client_calls,
    )
    with torch.no_grad():  # move away from the tiny init so every term matters
        for table in (sim.server.shared, sim.local):
            for k in table:
                table[k] = table[k] * 5
    return sim


def _step_params(sim, active):
    return {**sim.server.broadcast(active), **{k: v[active] for k, v in sim.local.items()}}


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_vectorized_step_equals_loop_over_clients(world, name):
    sim = _sim(world, name)
    active = torch.arange(sim.n_clients)
    batch = sim.data.batches(active, 1, 8, "shuffle", Streams(3), 0)[0]
    norm = sim.sizes.clamp(max=8)
    together, loss = sim.update.gradients(_step_params(sim, active), active, batch, norm, 0, 0, sim.streams)
    for c in range(sim.n_clients):
        one = torch.tensor([c])
        alone, l1 = sim.update.gradients(
            _step_params(sim, one), one, batch.rows(c, c + 1), norm[c : c + 1], 0, 0, sim.streams
        )
        assert torch.allclose(l1, loss[c : c + 1], atol=1e-6)
        # a method's own classifier (pFedMoAP's gate: softmax of 10×-scaled dot products) amplifies the
        # float32 round-off of batched against one-client matmuls a little
        atol = 1e-6 if spec(name).one_context else 1e-5
        for key in together:
            assert torch.allclose(together[key][c], alone[key][0], atol=atol), (name, key, c)


@pytest.mark.parametrize("sync", ["step", "fedavg"])
@pytest.mark.parametrize("name", ["fedotp-lite", "dpfpl"])
def test_round_equals_per_client_loop(world, name, sync):
    """A whole round of the engine equals clients trained one after another with their own optimizers,
    written here from the method's public pieces only."""
    sim = _sim(world, name, sync=sync, weight_decay=0.0)
    start = {k: v.clone() for k, v in sim.params.items()}
    batches = sim.data.batches(torch.arange(sim.n_clients), sim.local_steps, 8, "shuffle", Streams(3), 0)
    sim.run_round()
    lr, mom = sim.s.lr_at(0), sim.s.momentum
    weights = sim.sizes / sim.sizes.sum()
    glob, local = start["global"][0].clone(), start["local"].clone()
    copies = [glob.clone() for _ in range(sim.n_clients)]
    bufs_l = [torch.zeros_like(local[0]) for _ in range(sim.n_clients)]
    bufs_g = [torch.zeros_like(glob) for _ in range(sim.n_clients)]
    server_buf = torch.zeros_like(glob)
    for step, batch in enumerate(batches):
        global_grads = []
        for c in range(sim.n_clients):
            g_in = copies[c] if sync == "fedavg" else glob
            gens = client_streams(3, Purpose.FACTORIZATION, [c], 0, step)
            v = sim.method.views({"global": g_in[None], "local": local[c : c + 1]}, gens)
            text = sim.tower(v.ctx[:, None])
            b = batch.rows(c, c + 1)
            logits = 20.0 * torch.einsum("bne,bce->bnc", b.x, text)
            ce = torch.nn.functional.cross_entropy(logits[0], b.y[0], reduction="none")
            loss = (ce * b.mask[0]).sum() / b.mask[0].sum()
            g = dict(zip(v.leaves, torch.autograd.grad(loss, list(v.leaves.values()))))
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
    assert torch.allclose(sim.local["local"], local, atol=1e-6)
    assert torch.allclose(sim.server.shared["global"][0], glob, atol=1e-6)


@pytest.mark.parametrize("name", TEXT_METHODS)
@pytest.mark.parametrize(
    "sync, sampling, participation", [("step", "shuffle", 1.0), ("fedavg", "poisson", 1.0), ("step", "poisson", 0.67)]
)
def test_one_client_calls_equal_the_vectorized_round(world, name, sync, sampling, participation):
    """Each participant as its own one-client call (drawing its own batches and streams, as a Flower
    node would) ends the same rounds with the same parameters and optimizer state."""
    kw = dict(sync=sync, sampling=sampling, participation=participation)
    together, alone = _sim(world, name, **kw), _sim(world, name, one_client_calls=True, **kw)
    for _ in range(2):
        a, b = together.run_round(), alone.run_round()
        assert a["participants"] == b["participants"]
    tables = [
        (together.params, alone.params),
        (together.momentum, alone.momentum),
        (together.server.momentum, alone.server.momentum),
    ]
    # some optimizer state exists to compare (a control whose clients train nothing has none)
    assert any(x for x, _ in tables[1:]) or name == "fedsp-server-only"
    atol = 1e-5 if spec(name).one_context else 1e-4  # pFedMoAP's gate amplifies float32 round-off
    for x, y in tables:
        assert set(x) == set(y)
        for k in x:
            assert torch.allclose(x[k], y[k], rtol=1e-5, atol=atol), (k, float((x[k] - y[k]).abs().max()))
    assert torch.equal(together.participations, alone.participations)
    if participation < 1:
        assert together.participations.min() < 2  # someone sat a round out


@pytest.mark.parametrize("name", ["dpfpl", "promptfl", "fedpgp"])
@pytest.mark.parametrize("sync, sampling", [("step", "shuffle"), ("fedavg", "poisson")])
def test_the_memory_budget_splits_clients_into_calls_with_the_same_result(world, name, sync, sampling):
    """A sequence budget of two clients' classes trains 3 clients in calls of 2 and 1, to the same end."""
    tower, train, clients, reference = world
    budget = PromptTower(tower.backbone, tower.classnames, n_ctx=4, max_sequences=2 * tower.num_classes + 1)
    together, split = (
        _sim(world, name, sync=sync, sampling=sampling),
        _sim((budget, train, clients, reference), name, sync=sync, sampling=sampling),
    )
    assert together.clients_per_call >= 3 and split.clients_per_call == 2
    widths = []
    update = split.update.__call__
    split.update = lambda shared, state, *a: widths.append(len(state.clients)) or update(shared, state, *a)
    for _ in range(2):
        together.run_round(), split.run_round()
    assert set(widths) == {2, 1}
    for x, y in [(together.params, split.params), (together.momentum, split.momentum)]:
        for k in x:
            assert torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-5), (k, float((x[k] - y[k]).abs().max()))


def test_per_sample_dp_counts_every_records_backward_against_the_budget(world):
    from pfpl.privacy.mechanisms import PerSampleDP

    tower, train, clients, _ = world
    budget = PromptTower(tower.backbone, tower.classnames, n_ctx=4, max_sequences=2 * 8 * tower.num_classes)
    settings = TrainSettings(rounds=1, local_steps=1, batch_size=8)
    method = get_method("dpfpl")(MethodSettings(rank=2))
    plain = Simulator(method, budget, ClientData(train, clients), settings, scale=20.0)
    private = Simulator(
        method, budget, ClientData(train, clients), settings, 20.0, mechanism=PerSampleDP(1.0, 0.0, ("u", "v"))
    )
    assert plain.clients_per_call == 16 and private.clients_per_call == 2  # 8 records' graphs per client


def test_a_client_draws_the_same_alone_as_in_any_batch(world):
    """Batches, factorization starts and noise of client 1 do not depend on who else trains."""
    tower, train, clients, _ = world
    data = ClientData(train, clients)
    for sampling in ("shuffle", "poisson"):
        with_all = data.batches(torch.tensor([0, 1, 2]), 3, 8, sampling, Streams(7), 4)
        alone = data.batches(torch.tensor([1]), 3, 8, sampling, Streams(7), 4)
        for s in range(3):
            m = with_all[s].mask[1].bool()
            assert torch.equal(with_all[s].y[1][m], alone[s].y[0][alone[s].mask[0].bool()])
            assert torch.equal(with_all[s].x[1][m], alone[s].x[0][alone[s].mask[0].bool()])
    for purpose in (Purpose.FACTORIZATION, Purpose.SAMPLE_NOISE):
        a = client_streams(7, purpose, [0, 1, 2], 4, 2)[1]
        b = client_streams(7, purpose, [1], 4, 2)[0]
        assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))
    keys = {(p, c) for p in Purpose for c in (0, 1)}
    draws = {k: float(torch.rand(1, generator=client_streams(7, k[0], [k[1]], 4, 2)[0])) for k in keys}
    assert len(set(draws.values())) == len(keys)  # purposes and clients are independent streams


def test_dpfpl_forward_is_global_plus_local(world):
    sim = _sim(world, "dpfpl")
    everyone = torch.arange(3)
    gens = client_streams(0, Purpose.FACTORIZATION, everyone)
    views = sim.method.views(_step_params(sim, everyone), gens)
    assert torch.allclose(views.ctx, sim.server.shared["global"][0] + sim.local["local"], atol=1e-6)
    lora = _sim(world, "dplora")
    lv = lora.method.views(_step_params(lora, everyone), gens)
    assert not torch.allclose(lv.ctx, lora.server.shared["global"][0] + lora.local["local"], atol=1e-3)


def test_non_participants_do_not_move(world):
    sim = _sim(world, "fedotp-lite", participation=0.34)
    before = sim.local["local"].clone()
    active = sim.server.participants(0)
    assert len(active) == 1
    sim.run_round()
    idle = [c for c in range(3) if c not in active.tolist()]
    assert torch.equal(sim.local["local"][idle], before[idle])
    assert not torch.equal(sim.local["local"][active], before[active])
    assert torch.equal(sim.momentum["local"][idle], torch.zeros_like(before[idle]))


def test_promptfl_shares_one_prompt_and_coop_shares_none(world):
    promptfl, coop = _sim(world, "promptfl"), _sim(world, "coop")
    promptfl.run_round()
    coop.run_round()
    ctx = promptfl.personalized_context()
    assert torch.equal(ctx[0], ctx[1]) and torch.equal(ctx[1], ctx[2])
    assert not coop.server.shared and coop.personalized_context().shape[0] == 3


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


def test_groups_share_inside_and_not_across(world):
    """Two groups: a server phase splits the clients after round 1; each group's shared prompt then
    moves only with its own members' uploads, and a client receives its own group's value."""
    sim = _sim(world, "fedotp-lite")

    def split(s, round_index):
        if round_index == 0:
            s.server.regroup(torch.tensor([0, 1, 1]), s.sizes)

    sim.phases.append(split)
    before = sim.server.shared["global"][0].clone()
    sim.run_round()
    g = sim.server.shared["global"]
    assert g.shape[0] == 2 and torch.equal(g[0], g[1])  # both start from the old global prompt
    assert not torch.equal(g[0], before)
    sim.run_round()
    g = sim.server.shared["global"]
    assert not torch.allclose(g[0], g[1])
    shared = sim.server.broadcast(torch.arange(3))["global"]
    assert torch.equal(shared[0], g[0]) and torch.equal(shared[1], g[1]) and torch.equal(shared[2], g[1])
    # group 0 is client 0 alone: the same round with clients 1 and 2 absent leaves it the same
    lonely = _sim(world, "fedotp-lite")
    lonely.phases.append(split)
    lonely.run_round()
    lonely.server.participants = lambda r: torch.tensor([0])
    lonely.run_round()
    assert torch.allclose(lonely.server.shared["global"][0], g[0], atol=1e-6)
    assert not torch.allclose(lonely.server.shared["global"][1], g[1])


def test_regroup_starts_each_group_from_its_members_weighted_values(world):
    sim = _sim(world, "promptfl")
    sim.server.regroup(torch.tensor([0, 1, 1]), sim.sizes)
    with torch.no_grad():
        sim.server.shared["global"][1] += 1.0
    sim.server.regroup(torch.tensor([0, 0, 1]), torch.tensor([20.0, 25.0, 15.0]))
    g = sim.server.shared["global"]
    assert g.shape[0] == 2
    # new group 0 = (20·old group 0 + 25·old group 1) / 45; new group 1 = old group 1
    assert torch.allclose(g[1] - g[0], torch.full_like(g[0], 20 / 45), atol=1e-6)


def test_sgd_step_matches_torch_sgd():
    p = torch.randn(3, 4)
    g = torch.randn(3, 4)
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    buf = torch.zeros_like(p)
    for _ in range(3):
        ref.grad = g.clone()
        opt.step()
        p, buf = sgd_step(p, buf, g, 0.1, 0.9, 0.01)
    assert torch.allclose(p, ref.detach(), atol=1e-6)
