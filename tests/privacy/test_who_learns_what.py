"""The privacy claims tested as the parties they protect against would attack them (DESIGN §5, "Who
learns what"), not only with the accountant: a server holding the config, the run folder and every
message; colluding clients under secure aggregation; the receiver of a released prompt."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pfpl.config import build_config, load_config
from pfpl.federation.runner import run
from pfpl.federation.server import Server
from pfpl.messages import Contributions

SMALL = [
    "federation.n_clients=4",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "prompt.n_ctx=2",
    "train.rank=1",
]
PRIVATE = ["dp.mode=feature", "dp.noise_multiplier=5.0", "dp.sampling=poisson", "train.methods=['promptfl', 'dpfpl']"]


SECRETS: list[bytes] = []  # every secret the runs drew (to look for them in what a run publishes)


def _run(tmp, name, overrides, monkeypatch):
    """A run into tmp/name; returns (its folder, every upload the server received, in order)."""
    import pfpl.streams

    seen: list[dict[str, torch.Tensor]] = []
    receive = Server.receive
    entropy = pfpl.streams.entropy
    monkeypatch.setattr(pfpl.streams, "entropy", lambda n: SECRETS.append(entropy(n)) or SECRETS[-1])

    def spy(self, upload, round_index, step=0):
        seen.append({"loss": upload.loss.clone(), **{k: v.clone() for k, v in upload.values.items()}})
        seen[-1].update({f"extra:{k}": v for k, v in upload.extras.items()})
        return receive(self, upload, round_index, step)

    monkeypatch.setattr(Server, "receive", spy)
    cfg = load_config(None, [*SMALL, f"cache_dir='{tmp / 'cache'}'", *overrides])
    run(cfg, tmp / name)
    monkeypatch.setattr(Server, "receive", receive)
    monkeypatch.setattr(pfpl.streams, "entropy", entropy)
    return tmp / name, seen


def _released(folder, method):
    return torch.load(folder / f"prompts-{method}.pt", weights_only=True)["context"]


def _relative(a: dict, b: dict) -> float:
    """The smallest relative residual ‖a − b‖ / ‖b‖ over the uploaded tensors."""
    keys = [k for k in b if k != "loss" and not k.startswith("extra:")]
    return min(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two private runs with secret noise, one seeded (an experiment), and the server's replay of the
    first from everything it holds: the run folder's config.json (and, worst case, every record)."""
    tmp = tmp_path_factory.mktemp("who")
    mp = pytest.MonkeyPatch()
    out = {
        "secret": _run(tmp, "secret", PRIVATE, mp),
        "secret2": _run(tmp, "secret2", PRIVATE, mp),
        "seeded": _run(tmp, "seeded", [*PRIVATE, "dp.randomness=seeded"], mp),
    }
    held = json.loads((out["secret"][0] / "config.json").read_text())
    assert held["dp"]["randomness"] == "secret"
    held["dp"]["randomness"] = "seeded"  # the server's best guess: the streams the seed it holds gives
    cfg = build_config(held)
    cfg.cache_dir = tmp / "cache"
    seen = []
    receive = Server.receive
    mp.setattr(
        Server,
        "receive",
        lambda self, u, r, step=0: (
            seen.append({"loss": u.loss, **{k: v.clone() for k, v in u.values.items()}}),
            receive(self, u, r, step),
        )[1],
    )
    run(cfg, tmp / "replay")
    mp.undo()
    out["replay"] = (tmp / "replay", seen)
    return out


def test_the_server_cannot_regenerate_a_clients_noise_from_the_config_it_holds(runs):
    """The server replays the run from its config.json (it may even know every record): against the
    seeded run it reproduces every upload exactly (the attack works, so the test can fail); against
    the secret run the residual of every upload is at the noise's scale (two independent draws: ≈ √2)."""
    replay = runs["replay"][1]
    seeded, secret = runs["seeded"][1], runs["secret"][1]
    assert len(replay) == len(seeded) == len(secret) > 0
    for ours, theirs in zip(seeded, replay):
        assert _relative(ours, theirs) == 0.0
    for ours, theirs in zip(secret, replay):
        assert _relative(ours, theirs) > 0.5


def test_two_private_runs_of_one_config_release_different_prompts(runs):
    for method in ("promptfl", "dpfpl"):
        a, b = _released(runs["secret"][0], method), _released(runs["secret2"][0], method)
        assert not torch.allclose(a, b)
        replay, seeded = _released(runs["replay"][0], method), _released(runs["seeded"][0], method)
        assert torch.equal(replay, seeded)  # a seeded run is regenerable by whoever holds its config
        assert not torch.allclose(replay, a)


def test_what_a_private_run_publishes_holds_no_secret_and_no_loss(runs):
    """Every upload of a private run is the mechanism's output and nothing else: no loss (NaN), no
    extras; no file the run publishes holds a secret or the loss (a checkpoint mid-run does: secret
    material, docs/privacy.md)."""
    folder, seen = runs["secret"]
    for upload in seen:
        assert torch.isnan(upload["loss"]).all() and not any(k.startswith("extra:") for k in upload)
    assert len(SECRETS) >= 2 * (4 + 1)  # both methods' four clients and server, in each secret run
    published = b"".join(
        p.read_bytes() for p in folder.iterdir() if p.name != "checkpoint.pt" and not p.name.endswith(".png")
    )
    for secret in SECRETS:
        assert secret not in published and secret.hex().encode() not in published
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" not in r for r in rows) and all(r["randomness"] == "secret" for r in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["setup"]["randomness"] == "secret"
    assert summary["methods"]["dpfpl"]["privacy"]["formal_guarantee"] is True


def test_a_seeded_private_run_says_it_has_no_formal_guarantee(runs, tmp_path, capsys):
    from pfpl.cli import main

    folder = runs["seeded"][0]
    summary = json.loads((folder / "summary.json").read_text())
    privacy = summary["methods"]["dpfpl"]["privacy"]
    assert summary["setup"]["randomness"] == "seeded" and privacy["formal_guarantee"] is False
    assert "NOT formal" in privacy["guarantee"] and "config seed" in privacy["guarantee"]
    assert all(why and "seed" in why for why in privacy["holds_against"].values())
    out = tmp_path / "p.safetensors"
    assert main(["export", str(folder), "--method", "dpfpl", "--client", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    assert cert["formal_guarantee"] is False and cert["randomness"] == "seeded"
    assert cert["guarantee"].startswith("no formal guarantee") and "config seed" in cert["guarantee"]
    secret = json.loads((runs["secret"][0] / "summary.json").read_text())["methods"]["dpfpl"]["privacy"]
    assert secret["formal_guarantee"] is True and all(v is None for v in secret["holds_against"].values())


# ---- distributed DP under secure aggregation --------------------------------------------------------
def _secure(n, clients, colluders=None):
    from pfpl.secure.aggregator import SecureAggregator, SecureSettings

    settings = SecureSettings(graph="full", threshold=0.6, noise_bits=10, colluders=colluders)
    return SecureAggregator(settings, noise_std=2.0, clients=clients)


def _zeros(n, dim):
    return Contributions(
        torch.zeros(n, dim), torch.full((n,), 10.0), torch.arange(n), torch.zeros(n, dtype=torch.long), 1
    )


def _seeded_shares(agg, n, dim, seed, threshold):
    """What the server computes of the clients' Skellam shares from the seed it holds."""
    from pfpl.privacy import skellam
    from pfpl.streams import Purpose, Streams

    guess = Streams(seed)
    lam = agg.noise_share(threshold)
    return sum(skellam.sample(lam, (dim,), guess.draws(Purpose.DP_SHARE, 0, 0, c, 0)).double() for c in range(n))


@pytest.mark.parametrize("secret", [True, False])
def test_the_server_cannot_subtract_the_distributed_noise_shares(secret):
    """The server decodes the noisy sum and subtracts every client's Skellam share regenerated from its
    seed: with seeded streams the error falls to fixed-point rounding (the reviewer's attack); with
    the clients' secrets it stays at the noise's scale."""
    from pfpl.streams import SeededDraws, Streams

    n, dim = 8, 4000
    clients = Streams.create(0, range(n), secret=secret)
    agg = _secure(n, clients)
    decoded = agg(_zeros(n, dim), SeededDraws(torch.Generator()))[0].double() * (10.0 * n)  # the sum
    t = agg.settings.threshold_for(n)
    residual = decoded - _seeded_shares(agg, n, dim, 0, t) / agg.scale()
    noise_std = float(decoded.std())
    assert noise_std == pytest.approx(2.0 * math.sqrt(n / agg.settings.honest_for(t)), rel=0.05)
    if secret:
        assert float(residual.std()) > 0.9 * noise_std
    else:
        assert float(residual.abs().max()) < 1e-6 * noise_std + 1 / agg.scale()


def _independent_epsilon(sigma_local, noise_std_real, sensitivity, q, steps, delta):
    """ε of the run as an independent party computes it: per step, the record's local Gaussian (σ on
    its private leaves) and the residual distributed noise on the shared sum (a Skellam of variance
    noise_std_real² in real units, taken as a Gaussian of that variance) act on the same batch — one
    Gaussian at σ_eff — Poisson-subsampled at q and composed over every step (dp-accounting PLD)."""
    import dp_accounting

    sigma_shared = noise_std_real / sensitivity
    sigma_eff = (sigma_local**-2 + sigma_shared**-2) ** -0.5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma_eff)), steps
    )
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("colluders", [None, 2])
def test_distributed_dp_holds_against_the_server_and_its_colluders(tmp_path, colluders):
    """A default secure DP-FPL run with distributed DP at target ε = 1: the server plus the colluders
    the noise is sized for (default t − 1) subtract the colluders' own shares; what the honest
    survivors' noise alone gives, computed independently, stays within the ε pfpl reports. The old
    sizing (each client λ/t) would not against t − 1 colluders: the independent ε exceeds it."""
    from pfpl.federation.client import steps_per_round
    from pfpl.federation.context import Benchmark
    from pfpl.federation.wiring import build_aggregator, train_settings

    sets = [
        *SMALL,
        "federation.n_clients=8",
        "federation.rounds=3",
        "federation.secure_aggregation=true",
        "dp.mode=per-sample",
        "dp.target_epsilon=1.0",
        "train.methods=['dpfpl']",
        f"cache_dir='{tmp_path / 'cache'}'",
    ]
    if colluders is not None:
        sets.append(f"secure.colluders={colluders}")
    cfg = load_config(None, sets)
    bench = Benchmark(cfg)
    plan = bench.privacy_plan("dpfpl")
    agg = build_aggregator(cfg, plan)
    n = cfg.federation.n_clients
    t = agg.settings.threshold_for(n)
    c = t - 1 if colluders is None else colluders
    sizes = bench.partition.sizes()
    settings = train_settings(cfg)
    steps = steps_per_round(sizes, settings) * cfg.federation.rounds
    size = min(sizes)
    q = min(cfg.federation.batch_size, size) / size
    sensitivity = plan.clip * plan.max_record_weight  # one record's move of a group's weighted sum
    # the sum's noise the honest survivors alone carry (at least t survive, c of them collude)
    honest_lam = (t - c) * agg.noise_share(t)
    std_real = math.sqrt(2 * honest_lam) / agg.scale()
    eps = _independent_epsilon(plan.sigma, std_real, sensitivity, q, steps, plan.delta)
    assert eps <= 1.0 + 1e-6, eps
    old_lam = (t - c) * agg.lam_total() / t  # what the colluders left of the old shares λ/t
    old = _independent_epsilon(plan.sigma, math.sqrt(2 * old_lam) / agg.scale(), sensitivity, q, steps, plan.delta)
    if colluders is None:  # t − 1 colluders left one honest share of λ/t: the old sizing's ε does not hold
        assert old > 1.1, old
    assert plan.parties()["server+colluders"] is None and plan.describe()["secure_aggregation"]["distributed_dp"]


# ---- the receiver of a released prompt ---------------------------------------------------------------
SECFPP = [
    *SMALL,
    "federation.n_clients=6",
    "federation.partition=domain",
    "train.methods=['secfpp-global']",
    "dp.mode=feature",
    "dp.target_epsilon=1.0",
    "prompt.n_ctx=2",
]


def _rows_like_domain(folder, client):
    """Which classes' rows of a client's released SecFPP context equal the shared domain prompt."""
    prompts = torch.load(folder / "prompts-secfpp-global.pt", weights_only=True)
    ctx, domain = prompts["context"][client], prompts["shared"]["domain"][0]
    return [bool(torch.allclose(row, domain)) for row in ctx]


@pytest.mark.parametrize("public", [False, True])
def test_a_private_secfpp_release_does_not_show_the_label_set(tmp_path, public):
    """Add one record of a class client 0 never held: a private release's structure does not move
    (every row differs from the domain prompt); with the label set declared public it does, and the
    certificate says the label set is treated as public."""
    from pfpl.cli import main

    extra = ["secfpp.public_label_set=true"] if public else []
    folder = tmp_path / "run"
    cfg = load_config(None, [*SECFPP, f"cache_dir='{tmp_path / 'cache'}'", *extra])
    run(cfg, folder)
    rows = _rows_like_domain(folder, 0)
    held = torch.load(folder / "prompts-secfpp-global.pt", weights_only=True)["local"]["held"][0].bool().tolist()
    if public:
        assert rows == [not h for h in held] and any(rows)  # the rows name the held classes
    else:
        assert not any(rows) and all(held)  # every class carries a class-level prompt
    out = tmp_path / "p.safetensors"
    assert main(["export", str(folder), "--method", "secfpp-global", "--client", "0", "--out", str(out)]) == 0
    from pfpl.prompts.artifact import PromptArtifact

    cert = PromptArtifact.load(out).certificate
    assert cert["formal_guarantee"] is True
    assert any("label set" in p for p in cert["public"]) == public


def test_certificate_labels_say_what_ran(tmp_path):
    """ε = ∞ is no guarantee; client-level-only runs are stated per client; secure aggregation and the
    client-level mechanism appear; a Skellam event is not called Gaussian."""
    from pfpl.federation.context import Benchmark

    def plan(*sets):
        cfg = load_config(None, [*SMALL, f"cache_dir='{tmp_path / 'cache'}'", "train.methods=['dpfpl']", *sets])
        return Benchmark(cfg).privacy_plan("dpfpl")

    inf = plan("dp.mode=feature", "dp.target_epsilon=inf").describe()
    assert inf["guarantee"].startswith("none") and not inf["formal_guarantee"]
    client = plan("dp.client_clip=1.0", "dp.client_noise_multiplier=1.0").describe()
    assert client["unit"] == "one client" and "client" in client["adjacency"]
    assert client["client_level"]["event_per_round"].startswith("Gaussian")
    assert client["client_level"]["holds_against"]["server"]  # the plaintext server sees every update
    secure = plan(
        "dp.client_clip=1.0", "dp.client_noise_multiplier=1.0", "federation.secure_aggregation=true"
    ).describe()
    assert "Skellam" in secure["client_level"]["event_per_round"] and secure["secure_aggregation"]["distributed_dp"]
    assert secure["client_level"]["holds_against"]["server"] is None
    plaintext = plan("dp.mode=per-sample", "dp.target_epsilon=1").describe()
    assert plaintext["holds_against"]["server"] and plaintext["holds_against"]["receiver"] is None


def test_secure_client_level_dp_claims_no_amplification_against_the_server(tmp_path):
    """Under secure aggregation the server picks the participants: a round is charged as if every
    client took part (the same ε at participation 0.5 as at 1)."""
    from pfpl.federation.context import Benchmark
    from pfpl.privacy.accounting import Accountant

    def eps(p):
        cfg = load_config(
            None,
            [
                *SMALL,
                f"cache_dir='{tmp_path / 'cache'}'",
                "train.methods=['promptfl']",
                "dp.client_clip=1.0",
                "dp.client_noise_multiplier=2.0",
                "federation.secure_aggregation=true",
                f"federation.participation={p}",
                "federation.client_sampling=poisson",
            ],
        )
        plan = Benchmark(cfg).privacy_plan("promptfl")
        ledger = Accountant("rdp")
        for _ in range(5):
            plan.charge_client_level(ledger)
        return ledger.epsilon(plan.delta)

    assert eps(0.5) == pytest.approx(eps(1.0))


def test_client_level_dp_alone_withholds_the_loss_and_needs_something_shared(tmp_path, monkeypatch):
    """A run private only through client-level DP: its uploads carry no loss either (the client's
    mechanism is the plain one, but the run is private); and a method that shares nothing (CoOp) is
    refused — no aggregate would be noised, so no client-level ε could mean anything."""
    from pfpl.errors import PrivacyConfigError
    from pfpl.federation.context import Benchmark

    client_level = ["dp.client_clip=1.0", "dp.client_noise_multiplier=1.0", "train.methods=['promptfl']"]
    _, seen = _run(tmp_path, "client-level", client_level, monkeypatch)
    assert seen and all(torch.isnan(u["loss"]).all() for u in seen)
    cfg = load_config(None, [*SMALL, f"cache_dir='{tmp_path / 'cache'}'", *client_level[:2], "train.methods=['coop']"])
    with pytest.raises(PrivacyConfigError, match="coop: it shares no parameter") as err:
        Benchmark(cfg).privacy_plan("coop")
    assert "\n" not in str(err.value)
