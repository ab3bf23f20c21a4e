"""The membership-inference audit driver on a tiny world: known leakage, no leakage, matched sets,
and the DP invariant (empirical ε lower bound ≤ the accountant's ε)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pfpl.algorithms.base import MethodSettings
from pfpl.artifacts import ReleasedPrompts, RunFolder
from pfpl.audit.audit import audit_targets
from pfpl.audit.metrics import roc_auc
from pfpl.audit.sets import half_splits, matched_sets
from pfpl.audit.shadows import AuditTarget, ShadowTraining
from pfpl.backbones.prompt_tower import PromptTower
from pfpl.config import Config, build_config
from pfpl.data.clients import ClientData
from pfpl.data.features import Features
from pfpl.federation.client import TrainSettings
from pfpl.federation.report import epsilons
from pfpl.federation.wiring import build_engine

SCALE = 20.0
SETTINGS = MethodSettings(init_std=0.3)
# a CoOp prompt overfit to its records: full batch, many steps, a large step for the random tiny tower
ENGINE = TrainSettings(rounds=200, local_steps=1, batch_size=64, lr=5.0, cosine=False, seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def world(tiny, classes):
    """Tiny backbone, prompt tower, and record generator: noisy features around class centres, so a
    prompt generalises a little and can memorise the noise of the records it trains on."""
    dim = tiny.model.text_projection.shape[1]
    centres = torch.nn.functional.normalize(
        torch.randn(len(classes), dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )

    def records(per_class: int, seed: int, noise: float = 3.0) -> Features:
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen) / math.sqrt(dim)
        return Features(torch.nn.functional.normalize(x, dim=-1), labels, torch.arange(len(labels)) % 2)

    return PromptTower(tiny, classes, n_ctx=4), records


def _train(tower, feats: Features, cfg: Config) -> tuple[torch.Tensor, float]:
    """A CoOp prompt trained on ``feats`` alone, by the run's engine factory: (released context [M, D], ε)."""
    settings = ENGINE if cfg.dp.mode == "off" else TrainSettings(**{**ENGINE.__dict__, "sampling": cfg.dp.sampling})
    sim, plan = build_engine(cfg, "coop", tower, ClientData(feats, [np.arange(len(feats))]), SCALE, settings=settings)
    for _ in range(ENGINE.rounds):
        sim.run_round()
    return sim.personalized_context()[0], epsilons(sim, plan)[0]


def _audit(tower, records, trained_on: str, per_class: int, dp: dict | None = None, shadows: int = 8):
    cfg = build_config({"prompt": {"init_std": SETTINGS.init_std}, "dp": dp or {}})
    train, heldout, pool = records(per_class, 1), records(per_class, 2), records(2 * per_class, 3)
    sets = matched_sets(np.arange(len(train)), train, heldout, pool, seed=0)
    fit_on = train if trained_on == "members" else records(per_class, 4)  # "elsewhere": disjoint records
    context, eps = _train(tower, fit_on, cfg)
    target = AuditTarget(
        0,
        context,
        train.subset(sets.members),
        heldout.subset(sets.nonmembers),
        pool.subset(sets.shadow_pool),
        accountant_epsilon=eps,
    )
    return audit_targets(
        tower, SCALE, ShadowTraining("coop", ENGINE, SETTINGS, config=cfg), [target], shadows=shadows, seed=0
    ), eps


def test_a_prompt_overfit_to_a_handful_of_records_is_detected(world):
    result, _ = _audit(*world, trained_on="members", per_class=3)
    attacks = result.report["attacks"]
    assert set(attacks) == {"loss", "calibrated_loss", "lira_online", "lira_offline", "shadow_model"}
    assert attacks["loss"]["n_members"] == attacks["loss"]["n_nonmembers"] == 18
    assert attacks["lira_online"]["auc"] > 0.75 and attacks["loss"]["auc"] > 0.75, attacks
    assert all(a["auc"] > 0.65 for a in attacks.values()), {k: a["auc"] for k, a in attacks.items()}
    client = result.report["per_client"]["0"]
    assert client["member_accuracy"] > client["nonmember_accuracy"] + 0.3  # it really overfit
    scores, is_member = result.scores["lira_online"]
    assert roc_auc(scores, is_member) == attacks["lira_online"]["auc"]
    json.dumps(result.report)  # JSON-ready


def test_a_prompt_trained_without_the_targets_sits_at_chance(world):
    result, _ = _audit(*world, trained_on="elsewhere", per_class=12)
    attacks = result.report["attacks"]
    n1 = n0 = attacks["loss"]["n_members"]
    band = 3 * math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))  # 3 σ of the AUC of random scores
    for name, a in attacks.items():
        assert abs(a["auc"] - 0.5) < band, (name, a["auc"], band)


def test_dp_audit_never_beats_the_accountant(world):
    """Strong DP (ε = 1) on the same overfitting recipe: the audit's ε lower bound stays below ε."""
    dp = {"mode": "feature", "target_epsilon": 1.0, "clip": 1.0}
    result, eps = _audit(*world, trained_on="members", per_class=3, dp=dp)
    assert 0 < eps <= 1.0 + 1e-6
    rows = list(result.report["attacks"].values()) + [
        a for c in result.report["per_client"].values() for a in c["attacks"].values()
    ]
    for a in rows:
        assert a["eps_lower_bound"] <= eps, a
        assert not a["exceeds_accountant"]
    assert result.report["accountant_epsilon"] == pytest.approx(eps)
    assert result.report["shadows"]["dp"]["mode"] == "feature"


def test_members_and_nonmembers_are_disjoint_matched_and_the_pool_is_separate():
    gen = torch.Generator().manual_seed(0)

    def split(n_per_pair: int, seed: int) -> Features:
        labels = torch.arange(4).repeat_interleave(3 * n_per_pair)  # 4 classes x 3 domains
        domains = torch.arange(3).repeat_interleave(n_per_pair).repeat(4)
        return Features(torch.randn(len(labels), 8, generator=gen), labels, domains)

    train, heldout = split(3, 0), split(2, 1)
    client = np.flatnonzero(np.isin(train.labels.numpy(), [0, 2]))  # two classes, 3 per pair
    s = matched_sets(client, train, heldout, None, seed=1)  # pool: the held-out records left over
    assert set(s.members) <= set(client) and s.dropped == len(client) - len(s.members) == 6
    pairs = lambda f, ix: sorted(zip(f.labels[ix].tolist(), f.domains[ix].tolist()))
    assert pairs(train, s.members) == pairs(heldout, s.nonmembers)  # same classes and domains, pair by pair
    assert set(heldout.labels[s.nonmembers].tolist()) == {0, 2}
    assert not set(s.nonmembers) & set(s.shadow_pool)  # one held-out split cut in two: disjoint
    assert set(heldout.labels[s.shadow_pool].tolist()) <= {0, 2}
    shadow = split(4, 2)
    s2 = matched_sets(client, train, heldout, shadow, seed=1, max_members=5)
    assert len(s2.members) == len(s2.nonmembers) <= 5 and s2.dropped == 5 - len(s2.members)
    assert set(shadow.labels[s2.shadow_pool].tolist()) <= {0, 2}


def test_lira_shadows_see_every_record_in_half_of_them():
    keys = np.repeat(np.arange(5), 4)
    m = half_splits(keys, 6, np.random.default_rng(0))
    assert (m.sum(0) == 3).all()  # complementary pairs: in for exactly half
    for k in range(5):
        assert (m[:, keys == k].sum(1) == 2).all()  # stratified: every shadow gets half of each pair


def _fake_run(folder, methods=("coop",)):
    """A finished-looking run folder: enough for the CLI's checks, which come before any training."""
    run = RunFolder(folder)
    cfg = build_config({"train": {"methods": list(methods)}})
    run.write_config(json.loads(cfg.model_dump_json()))
    (folder / "summary.json").write_text(json.dumps({"methods": {m: {"epsilon": None} for m in methods}}))
    for m in methods:
        run.save_prompts(
            m, ReleasedPrompts(torch.zeros(2, 4, 8), {}, torch.zeros(2, dtype=torch.long), {}, [torch.arange(3)] * 2)
        )
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "no run folder"),
        (["{run}", "--shadows", "1"], "--shadows must be at least 4"),
        (["{run}", "--shadows", "3"], "--shadows must be at least 4"),
        (["{run}", "--methods", "dpfpl"], "method 'dpfpl' is not in run"),
        (["{run}", "--clients", "0-5"], "client 2 does not exist"),
        (["{run}", "--members", "0"], "--members must be at least 1"),
        ([], "give a run folder"),
        (["{run}", "--config", "x.toml"], "either RUN_DIR"),
        (["{unfinished}"], "has not finished"),
    ],
)
def test_bad_audit_requests_are_one_line_and_exit_2(tmp_path, capsys, args, message, monkeypatch):
    from pfpl.cli import main
    from pfpl.federation import runner

    monkeypatch.setattr(runner, "Benchmark", lambda cfg: pytest.fail("bad input must fail before any work"))
    run = _fake_run(tmp_path / "run")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    paths = {"run": run, "missing": tmp_path / "nope", "unfinished": unfinished}
    code = main(["audit", *[a.format(**paths) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pfpl: ") and message in err[0], err


def test_pfpl_audit_config_trains_audits_and_writes_the_report(tmp_path, capsys):
    """End to end on the embedded benchmark, tiny (~6 s): ``--config`` trains a run, then audits it."""
    from pfpl.cli import main

    sets = [
        "federation.n_clients=5",  # SecFPP's secure clustering needs 5 (K = 2, T = 1)
        "federation.partition='iid'",
        "federation.rounds=2",
        "federation.local_steps=2",
        "data.train_per_class_domain=1",
        "data.val_per_class_domain=1",
        "data.test_per_class_domain=2",
        "prompt.n_ctx=2",
        "train.rank=1",
        "train.methods=['coop', 'promptfl', 'dpfpl', 'secfpp']",
        f"cache_dir='{tmp_path / 'cache'}'",
    ]
    config = Path(__file__).resolve().parents[2] / "configs" / "audit.toml"
    args = [
        "audit",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "run"),
        "--clients",
        "0,1",
        "--shadows",
        "4",
        "--json",
    ]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "run" / "audit.json").is_file() and (tmp_path / "run" / "audit.png").is_file()
    assert set(report["methods"]) == {"coop", "promptfl", "dpfpl", "secfpp"}  # secfpp: class-specific contexts
    for name in ("loss", "calibrated_loss", "lira_online", "lira_offline", "shadow_model"):
        row = report["attacks"][name]
        assert 0 <= row["auc"] <= 1 and 0 <= row["tpr_at_1pct_fpr"] <= 1 and row["eps_lower_bound"] >= 0
    coop = report["methods"]["coop"]
    assert set(coop["per_client"]) == {"0", "1"}
    assert coop["attacks"]["loss"]["n_members"] == coop["attacks"]["loss"]["n_nonmembers"]
    assert report["methods"]["promptfl"]["shadows"]["design"].startswith("personal copy")
    assert report["violations"] == []


def test_shadows_train_on_the_shared_prompt_of_their_targets_group(world):
    """Targets from several groups (SecFPP clusters): each shadow starts from, and keeps, the domain
    prompt its own target received, and no server phase re-clusters the shadows."""
    from pfpl.audit.shadows import shadow_simulator

    tower, records = world
    feats = records(3, 0)
    gen = torch.Generator().manual_seed(1)
    released = {"domain": torch.randn(2, 4, tower.prefix.shape[-1], generator=gen) * 0.3}
    clients = [np.arange(0, 6), np.arange(6, 12), np.arange(12, 18)]
    cfg = build_config({"prompt": {"init_std": SETTINGS.init_std}})
    training = ShadowTraining("secfpp", ENGINE, SETTINGS, config=cfg, released=released)
    sim, _ = shadow_simulator(training, tower, feats, clients, SCALE, None, seed=0, groups=[1, 0, 1])
    assert sim.phases == []
    for _ in range(2):
        sim.run_round()
    got = sim.server.broadcast(torch.arange(3))["domain"]
    torch.testing.assert_close(got, released["domain"][[1, 0, 1]].to(got))
    with pytest.raises(Exception, match="indices below 2"):
        shadow_simulator(training, tower, feats, clients, SCALE, None, seed=0, groups=[0, 2, 1])


@pytest.mark.parametrize(
    "method, message",
    [
        ("promptfolio", "more than one context"),
        ("pfedmoap", "more than one context"),
        ("fedotp", "more than one context"),
        ("vpt", "vision prompts"),
    ],
)
def test_methods_the_audit_cannot_attack_are_refused_in_one_line(tmp_path, capsys, monkeypatch, method, message):
    """The peers whose classifier is not one context, and vision prompts, which change the image
    features the attacks read: refused before any work (FedTPG's one context per class is audited)."""
    from pfpl.cli import main
    from pfpl.federation import runner

    monkeypatch.setattr(runner, "Benchmark", lambda cfg: pytest.fail("bad input must fail before any work"))
    run = _fake_run(tmp_path / "run", methods=(method,))
    code = main(["audit", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
