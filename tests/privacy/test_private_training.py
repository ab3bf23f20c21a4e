"""DP-aware training choices: the clip from measured gradient norms, learning rate and momentum per ε."""

import math

import pytest
import torch
import torch.nn.functional as F

from pfpl.backbones import PromptTower
from pfpl.config import load_config
from pfpl.data.features import image_features
from pfpl.evaluation.federated import EvalPlan, evaluate_clients
from pfpl.federation.context import Benchmark
from pfpl.federation.runner import run
from pfpl.federation.wiring import private_sgd
from pfpl.privacy import defaults
from pfpl.privacy.clipping import quantile_clip, record_gradient_norms


def _one_record_grads(tower, ctx, feats, scale, wrt):
    out = []
    for x, y in zip(feats.features, feats.labels):
        leaf = ctx.detach().clone().requires_grad_(True)
        text = tower(leaf)[0]
        if wrt == "feature":
            text = text.detach().requires_grad_(True)
        loss = F.cross_entropy(scale * x[None] @ text.t(), y[None])
        (grad,) = torch.autograd.grad(loss, [text if wrt == "feature" else leaf])
        out.append(grad.norm())
    return torch.stack(out)


@pytest.mark.parametrize("space", ["feature", "context"])
def test_measured_norms_equal_one_backward_per_record(tiny, classes, random_features, space):
    tower = PromptTower(tiny, classes, 4)
    ctx = torch.randn(4, tiny.ctx_dim, generator=torch.Generator().manual_seed(1)) * 0.1
    feats = random_features(tiny, 12)
    norms = record_gradient_norms(tower, ctx, feats.features, feats.labels, 10.0, space)
    assert torch.allclose(norms, _one_record_grads(tower, ctx, feats, 10.0, space), rtol=1e-4)


def test_quantile_clip_is_the_norms_quantile_and_refuses_zero():
    norms = torch.arange(1.0, 102.0)
    assert quantile_clip(norms, 0.5) == pytest.approx(51.0)
    assert quantile_clip(norms, 1.0) == pytest.approx(101.0)
    with pytest.raises(ValueError, match="set dp.clip instead"):
        quantile_clip(torch.zeros(5), 0.5)


def test_private_runs_take_dp_values_or_the_default_for_their_mode_and_epsilon():
    plain = load_config(None, ["train.lr=0.05", "train.momentum=0.5"])
    assert private_sgd(plain) == (0.05, 0.5)
    for mode, rows in defaults.PRIVATE_SGD.items():
        for eps, lr, momentum in rows:
            cfg = load_config(None, [f"dp.mode={mode}", f"dp.target_epsilon={eps}"])
            assert private_sgd(cfg) == (lr, momentum)
            between = load_config(None, [f"dp.mode={mode}", f"dp.target_epsilon={eps * 1.2}"])
            assert private_sgd(between) == (lr, momentum)  # nearest row on a log scale
    chosen = load_config(None, ["dp.mode=feature", "dp.target_epsilon=1", "dp.lr=0.123", "dp.momentum=0"])
    assert private_sgd(chosen) == (0.123, 0.0)
    given_sigma = load_config(None, ["dp.mode=feature", "dp.noise_multiplier=2", "train.lr=0.05"])
    assert private_sgd(given_sigma)[0] == 0.05  # no target ε: no default to choose from
    reference = load_config(None, ["dp.mode=reference", "dp.target_epsilon=1", "train.lr=0.05"])
    assert private_sgd(reference)[0] == 0.05
    assert defaults.private_sgd("feature", math.inf) is None


SMALL = [
    "federation.n_clients=4",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "train.methods=['dpfpl', 'coop']",
    "train.rank=2",
    "prompt.init='a photo of a'",
    "dp.target_epsilon=2",
    "dp.clip_quantile=0.5",
]


@pytest.mark.parametrize("mode, space", [("per-sample", "context"), ("feature", "feature")])
def test_a_run_clips_at_the_quantile_measured_on_val_and_keeps_its_epsilon(tmp_path, mode, space):
    cfg = load_config(
        None, SMALL + [f"dp.mode={mode}", f"cache_dir='{tmp_path / 'cache'}'", f"output_dir='{tmp_path / 'runs'}'"]
    )
    summary = run(cfg, tmp_path / "run")
    bench = Benchmark(cfg)
    val = image_features(bench.backbone, bench.dataset, "val", cfg.cache_dir)
    start = bench.tower.backbone.token_embeddings(bench.backbone.tokenize(["a photo of a"]))[0, 1:5]
    norms = record_gradient_norms(bench.tower, start, val.features, val.labels, bench.backbone.logit_scale, space)
    for m in ("dpfpl", "coop"):
        privacy = summary["methods"][m]["privacy"]
        assert privacy["clip"] == pytest.approx(float(torch.quantile(norms.double(), 0.5)), rel=1e-6)
        assert summary["methods"][m]["epsilon"] == pytest.approx(2.0, rel=1e-3)


def test_every_method_reports_its_val_accuracy_where_hyper_parameters_are_chosen(tmp_path):
    cfg = load_config(None, SMALL[:8] + [f"cache_dir='{tmp_path / 'cache'}'"])
    summary = run(cfg, tmp_path / "run")
    bench = Benchmark(cfg)
    val = image_features(bench.backbone, bench.dataset, "val", cfg.cache_dir)
    released = torch.load(tmp_path / "run" / "prompts-coop.pt")["context"]
    features = bench.tower(released[:, None])
    expected = evaluate_clients(features, val, EvalPlan.build(bench.partition, bench.train, val))
    got = summary["methods"]["coop"]["validation"]
    assert got == {"local": expected["local"], "neighbor": expected["neighbor"]}
    assert got != {k: summary["methods"]["coop"][k] for k in ("local", "neighbor")}  # not the test split's
