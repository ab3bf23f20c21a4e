"""Every method on Flower: the ones with a server phase that asks the clients (SecFPP's clustering),
the one whose server ships a model (FedSP), the one scored by patch features (FedOTP) and the ones
that prompt the image tower (VPT, DP-FPL on both towers) end where the simulator does, over real
Flower messages between the server driver and the nodes (the in-process grid)."""

from __future__ import annotations

import pytest
from flower_grid import InProcessGrid, job, same, small_cfg

from pfpl.config import load_config
from pfpl.federation import context
from pfpl.federation.flower.apps import run_job
from pfpl.federation.flower.node import flower_refusal
from pfpl.federation.runner import run
from tiny_runs import TINY_VISION_RUN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEDSP = [
    "train.methods=['fedsp']",
    "federation.sync='fedavg'",
    "fedsp.distill_steps=4",
    "fedsp.server_steps=2",
]


@pytest.mark.parametrize("extra", [[], ["federation.secure_aggregation=true"]], ids=["plain", "secagg"])
def test_fedsp_on_flower_ends_where_the_simulator_does(flower_cache, tmp_path, extra):
    """The server distils the auxiliary model and ships it once; the nodes train prompt and body on
    it; the server fine-tunes the averaged prompt with the full model it never ships; the product's
    scores on every node, and each client's own auxiliary product's, equal the simulator's."""
    cfg = small_cfg(flower_cache, *FEDSP, *extra)
    grid = InProcessGrid(3, flower_cache)
    flower = run_job(grid, job(cfg, tmp_path / "flower"))
    simulated = run(cfg, tmp_path / "sim")
    same(flower, simulated)
    assert [kind for kind, _ in grid.sent].count("query.model") == 3  # once per node
    report = flower["methods"]["fedsp"]["fedsp"]
    assert report["distilled"] and report["bytes_per_round"]["upload_mode"] == "prompt"
    assert report["bytes_per_round"] == simulated["methods"]["fedsp"]["fedsp"]["bytes_per_round"]
    # each client's own product (its auxiliary model, body and prompt), scored on its node
    own, expected = flower["methods"]["fedsp"]["auxiliary"], simulated["methods"]["fedsp"]["auxiliary"]
    assert set(own) == set(expected) and "local" in own
    assert all(own[k] == pytest.approx(expected[k], abs=1e-5) for k in expected if expected[k] is not None)


@pytest.mark.parametrize(
    "extra",
    [
        ["train.methods=['secfpp', 'secfpp-plain']"],
        ["train.methods=['secfpp']", "federation.secure_aggregation=true", "federation.sync='fedavg'"],
    ],
    ids=["secpc-and-plain", "secpc-secagg"],
)
def test_secfpp_on_flower_ends_where_the_simulator_does(flower_cache, tmp_path, extra):
    """SecFPP's clustering runs as requests to the clients on their nodes (keys, shares, hold, one
    evaluate per distance query); each client's vector never leaves its node in the clear (in
    ``secfpp-plain`` it does, by design); the clusters, the domain prompts and the scores equal the
    simulator's."""
    cfg = small_cfg(flower_cache, *extra)
    grid = InProcessGrid(3, flower_cache, record=True)
    flower = run_job(grid, job(cfg, tmp_path / "flower"))
    simulated = run(cfg, tmp_path / "sim")
    same(flower, simulated)
    for name in cfg.train.methods:
        x, y = flower["methods"][name], simulated["methods"][name]
        assert (x["ari"], x["groups"]) == (y["ari"], y["groups"]), name
        assert [e["assignment"] for e in x["clustering"]] == [e["assignment"] for e in y["clustering"]], name
    asked = [snap for kind, _, snap in grid.replies if kind == "query.phase"]
    assert asked, "the clustering never asked the nodes"
    if cfg.train.methods == ["secfpp"]:  # only public keys, ciphertexts, and distance-query results leave a node
        fields = {key for snap in asked for rec in snap["config"] for key in snap["config"][rec]} - {
            "version",
            "clients",
        }
        fields |= {key for snap in asked for rec in snap["array"] for key in snap["array"][rec]}
        assert fields <= {"public_key", "recipients", "ciphertexts", "held", "query", "results"}, fields


def test_fedotp_on_flower_scores_by_patch_features_as_the_simulator_does(flower_cache, tmp_path):
    """Each node trains and scores its clients on their records' patch features (cached beside the
    pooled ones): the scores equal the simulator's."""
    assert flower_refusal("fedotp") is None
    cfg = small_cfg(flower_cache, "train.methods=['fedotp']", "federation.rounds=1")
    flower = run_job(InProcessGrid(3, flower_cache), job(cfg, tmp_path / "flower"))
    same(flower, run(cfg, tmp_path / "sim"))


VISION = [
    *TINY_VISION_RUN,
    # vision prompts large enough, and test images enough, that the prompts change some predictions:
    # a node that scored without them would not match the simulator
    "data.test_per_class_domain=2",
    "prompt.init_std=0.3",
    "train.lr=1.0",
]


@pytest.mark.parametrize(
    "extra",
    [["train.methods=['vpt']"], ["train.methods=['dpfpl']", "prompt.modality='both'"]],
    ids=["vpt", "dpfpl-both"],
)
def test_vision_prompts_on_flower_score_each_client_as_the_simulator_does(tmp_path, monkeypatch, tiny_vit, extra):
    """On a random tiny ViT, each node scores every client it hosts (two on one node) with that
    client's own released vision prompts over the prompt-free tokens it caches: the scores equal the
    simulator's."""
    monkeypatch.setattr(context, "load_backbone", lambda *a, **k: tiny_vit)
    cache = tmp_path / "cache"
    cfg = load_config(None, [*VISION, f"cache_dir='{cache}'", *extra])
    flower = run_job(InProcessGrid(2, cache), job(cfg, tmp_path / "flower", supernodes=2))
    same(flower, run(cfg, tmp_path / "sim"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["promptfolio", "pfedmoap", "fedtpg"])
def test_the_peers_end_on_flower_where_the_simulator_does(flower_cache, tmp_path, method):
    """PromptFolio (its own mixed classifier), pFedMoAP (its server phase delivering other clients'
    prompts as experts) and FedTPG (a generator of class-specific contexts) over real messages."""
    assert flower_refusal(method) is None
    cfg = small_cfg(flower_cache, f"train.methods=['{method}']", "federation.rounds=2")
    flower = run_job(InProcessGrid(3, flower_cache), job(cfg, tmp_path / "flower"))
    same(flower, run(cfg, tmp_path / "sim"))
