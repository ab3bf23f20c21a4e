"""Every method on Flower: the ones with a server phase that asks the clients (SecFPP's clustering)
and the one whose server ships a model (FedSP) end where the simulator does, over real Flower
messages between the server driver and the nodes (the in-process grid)."""

from __future__ import annotations

import pytest
from flower_grid import InProcessGrid, job, same, small_cfg

from pfpl.federation.flower.apps import run_job
from pfpl.federation.runner import run

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
