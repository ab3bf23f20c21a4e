"""FedSP for CLIP: the auxiliary model reads the same prompts, distillation brings it closer to the
full model, only prompts travel, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch

from pfpl.backbones.auxiliary import auxiliary_backbone, parameter_report, text_body
from pfpl.backbones.distill import distill, feature_mse
from pfpl.backbones.prompt_tower import PromptTower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("mode, layers, expected_share", [("shared", 1, 0.5), ("truncate", 1, 0.5)])
def test_the_auxiliary_model_reads_the_same_prompts_with_fewer_blocks(tiny, classes, mode, layers, expected_share):
    aux = auxiliary_backbone(tiny, mode, layers)
    assert torch.equal(aux.text.token_embedding.weight, tiny.text.token_embedding.weight)
    assert torch.equal(aux.text.positional_embedding, tiny.text.positional_embedding)
    full_tower, aux_tower = PromptTower(tiny, classes, 3), PromptTower(aux, classes, 3)
    assert torch.equal(full_tower.prefix, aux_tower.prefix) and torch.equal(full_tower.suffix, aux_tower.suffix)
    ctx = torch.randn(2, 1, 3, tiny.ctx_dim) * 0.1
    out = aux_tower(ctx)
    assert out.shape == full_tower(ctx).shape == (2, len(classes), tiny.model.text_projection.shape[1])
    report = parameter_report(tiny, aux)
    assert report["auxiliary_transformer_share"] == pytest.approx(expected_share)  # 1 of the tiny model's 2 blocks
    depth = len(aux.text.transformer.resblocks)
    assert depth == (2 if mode == "shared" else 1)
    assert set(text_body(aux)) and all(k.startswith("transformer.resblocks.0.") for k in text_body(aux))
    # the auxiliary model is a copy: training it leaves the full model alone
    with torch.no_grad():
        next(iter(aux.text.transformer.parameters())).add_(1.0)
    assert not torch.equal(
        next(iter(aux.text.transformer.parameters())), next(iter(tiny.text.transformer.parameters()))
    )


def test_distillation_brings_the_auxiliary_features_closer_to_the_full_models(tiny, classes):
    aux = auxiliary_backbone(tiny, "shared", 1)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = [f"a photo of a {c}." for c in classes] + [f"a sketch of a {c}." for c in classes]
    before = feature_mse(aux, tiny, images, texts)
    report = distill(aux, tiny, images, texts, steps=60, lr=3e-3, batch=12)
    after = feature_mse(aux, tiny, images, texts)
    assert report["before"] == before and report["after"] == after
    assert after["text_mse"] < 0.5 * before["text_mse"]
    assert after["image_mse"] == pytest.approx(before["image_mse"], abs=1e-6)  # a ResNet image tower is kept whole


SMALL = [
    "federation.n_clients=3",
    "federation.rounds=2",
    "federation.local_steps=1",
    "federation.batch_size=8",
    "federation.sync='fedavg'",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "prompt.n_ctx=2",
    "train.rank=1",
    "fedsp.distill_steps=10",
    "fedsp.server_steps=2",
]


def _cfg(tmp_path, *extra):
    from pfpl.config import load_config

    return load_config(None, [*SMALL, f"cache_dir='{tmp_path / 'cache'}'", *extra])


def test_a_client_uploads_its_prompt_and_nothing_else(tmp_path):
    from pfpl.federation.context import Benchmark

    for upload, expected in (("prompt", set()), ("reference", None)):
        bench = Benchmark(_cfg(tmp_path, "train.methods=['fedsp']", f"fedsp.upload='{upload}'"))
        sim, _ = bench.engine("fedsp")
        everyone = torch.arange(sim.n_clients)
        state = sim._gather(everyone)
        batches = sim._batches(everyone, 0)
        message = sim.update(sim.server.broadcast(everyone), state, batches, sim.sizes, 0, 0, sim.streams)
        assert set(message.values) == {"prompt"}
        assert message.values["prompt"].shape == (3, 2, sim.tower.backbone.ctx_dim)
        if expected is not None:
            assert set(message.extras) == expected
        else:  # the explicitly named reference option also sends the body, which leaks more
            assert message.extras and all(k.startswith("body:") for k in message.extras)
            sim.server.receive(message, 0)  # the server keeps the size-weighted mean body for itself
            w = (sim.sizes / sim.sizes.sum()).double()
            for k, v in message.extras.items():
                mean = (v.double() * w.view(-1, *[1] * (v.dim() - 1))).sum(0)
                torch.testing.assert_close(sim.server.received[k][0].double(), mean, rtol=1e-5, atol=1e-6)
            assert not any(k.startswith("body:") for k in sim.server.broadcast(everyone))
        assert all(k.startswith("body:") for k in sim.local)  # the bodies are the clients' own


def test_a_resumed_fedsp_run_ends_with_the_same_metrics(tmp_path):
    from pfpl.artifacts import RunFolder
    from pfpl.federation.runner import resume, run

    cfg = _cfg(tmp_path, "train.methods=['fedsp']")
    whole = run(cfg, tmp_path / "whole")

    class Stop(Exception):
        pass

    def crash(method, done, total):
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        run(cfg, tmp_path / "killed", progress=crash)
    assert RunFolder(tmp_path / "killed").has_checkpoint()
    resumed = resume(tmp_path / "killed")
    assert resumed["methods"]["fedsp"]["local"] == whole["methods"]["fedsp"]["local"]
    assert resumed["methods"]["fedsp"]["auxiliary"] == whole["methods"]["fedsp"]["auxiliary"]
    report = whole["methods"]["fedsp"]["fedsp"]
    assert report["bytes_per_round"]["upload"] == report["bytes_per_round"]["download"] == 2 * 64 * 4  # 2 × 64 fp32
    json.dumps(whole)


def test_fedsp_needs_fedavg_sync_and_no_clear_body_under_secure_aggregation():
    from pfpl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fedavg"):
        load_config(None, ["train.methods=['fedsp']", "federation.sync='step'"])
    with pytest.raises(ConfigError, match="in the clear"):
        load_config(
            None,
            [
                "train.methods=['fedsp']",
                "federation.sync='fedavg'",
                "fedsp.upload='reference'",
                "federation.secure_aggregation=true",
            ],
        )


def test_sample_level_dp_charges_both_stages_of_every_round(tmp_path):
    """With ``dp.mode = feature`` every local step of both stages samples a fresh Poisson batch, so a
    client's ε must cover 2 × local_steps × rounds subsampled Gaussians (checked against
    dp-accounting, computed here); the ablation without the alignment stage is charged half."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from pfpl.federation.context import Benchmark
    from pfpl.federation.report import epsilons

    sigma, reported = 2.0, {}
    for method, stages in (("fedsp", 2), ("fedsp-noalign", 1)):
        cfg = _cfg(
            tmp_path,
            f"train.methods=['{method}']",
            "dp.mode='feature'",
            f"dp.noise_multiplier={sigma}",
            "dp.sampling='poisson'",
        )
        sim, plan = Benchmark(cfg).engine(method)
        for _ in range(cfg.federation.rounds):
            sim.run_round()
        reported[method] = epsilons(sim, plan)
        for c, eps in enumerate(reported[method]):
            q = min(1.0, cfg.federation.batch_size / float(sim.sizes[c]))
            steps = stages * sim.local_steps * cfg.federation.rounds
            acc = RdpAccountant()
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
            assert eps >= acc.get_epsilon(1e-5) * 0.99, (method, c)
    assert all(a > b for a, b in zip(reported["fedsp"], reported["fedsp-noalign"]))


def test_the_server_only_control_trains_nothing_on_the_clients_and_clients_only_has_no_server_phase(tmp_path):
    """fedsp-server-only: every client's upload is the prompt it received (the product is the server's
    fine-tuning alone); fedsp-clients-only: the averaged prompt is broadcast without fine-tuning."""
    from pfpl.federation.context import Benchmark

    bench = Benchmark(_cfg(tmp_path, "train.methods=['fedsp-server-only', 'fedsp-clients-only']"))
    server_only, _ = bench.engine("fedsp-server-only")
    everyone = torch.arange(server_only.n_clients)
    received = server_only.server.broadcast(everyone)
    state = server_only._gather(everyone)
    body = {k: v.clone() for k, v in state.params.items()}
    batches = server_only._batches(everyone, 0)
    message = server_only.update(received, state, batches, server_only.sizes, 0, 0, server_only.streams)
    assert message.values["prompt"].abs().max() == 0  # a FedAvg delta of zero
    assert all(torch.equal(body[k], state.params[k]) for k in body)  # no body trained either
    before = server_only.server.shared["prompt"].clone()
    server_only.run_round()
    assert not torch.equal(before, server_only.server.shared["prompt"])  # the server's fine-tuning moved it
    assert server_only.method.server_phases() and not server_only.method.distilled
    clients_only, _ = bench.engine("fedsp-clients-only")
    assert clients_only.method.server_phases() == [] and clients_only.method.distilled
