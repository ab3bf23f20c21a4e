"""Base-to-novel scores: each split classified in its own label space, the HM of the field, the
per-client average over rounds (DP-FPL's published metric)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from pfpl.data.features import Features
from pfpl.data.partitions import Partition
from pfpl.evaluation.federated import EvalPlan, average_rounds, evaluate_clients

# 4 classes, one axis each; classes 0, 1 are base (client 0 holds 0, client 1 holds 1), 2, 3 novel
E = 4


def _features(labels: list[int]) -> Features:
    x = torch.nn.functional.one_hot(torch.tensor(labels), E).float()
    return Features(x, torch.tensor(labels), torch.zeros(len(labels), dtype=torch.long))


TRAIN = _features([0, 0, 1, 1])
TEST = _features([0, 1, 2, 3, 2, 3])
PARTITION = Partition([np.array([0, 1]), np.array([2, 3])], "pathological")
NOVEL = np.array([2, 3])


def test_novel_is_classified_among_novel_classes_only():
    """Text features that send every novel image to a base class over the full label space, but to
    its own class among the novel ones: novel accuracy 1, the full-space neighbor figure unaffected."""
    plan = EvalPlan.build(PARTITION, TRAIN, TEST, NOVEL)
    assert plan.shared["base"].classes.tolist() == [0, 1] and plan.shared["novel"].classes.tolist() == [2, 3]
    assert sorted(plan.shared["novel"].index.tolist()) == [2, 3, 4, 5]
    text = torch.eye(E)
    text[2] = torch.tensor([0.0, 0.0, 0.5, 0.0])  # class 2's text: weaker than class 0's on a class-2 image...
    text[0] = torch.tensor([1.0, 0.0, 0.6, 0.0])  # ...because class 0's text also points at it
    out = evaluate_clients(text, TEST, plan)
    assert out["novel"] == 1.0
    full_space = float(((TEST.features[[2, 4]] @ text.t()).argmax(-1) == 2).float().mean())
    assert full_space == 0.0  # what the full label space would have said
    assert out["base"] == 1.0 and out["local"] == 1.0
    assert out["hm"] == pytest.approx(statistics.harmonic_mean([out["local"], out["base"], out["novel"]]))
    assert out["hm_std"] is None and len(out["per_client"]["hm"]) == 2


def test_hm_is_the_harmonic_mean_of_the_mean_scores():
    plan = EvalPlan.build(PARTITION, TRAIN, TEST, NOVEL)
    text = torch.stack([torch.eye(E), torch.eye(E)[[1, 0, 3, 2]]])  # client 1 swaps every pair
    out = evaluate_clients(text, TEST, plan)
    assert out["local"] == 0.5 and out["base"] == 0.5 and out["novel"] == 0.5
    assert out["per_client"]["hm"] == [1.0, 0.0]  # a zero score makes a client's HM zero
    assert out["hm"] == pytest.approx(0.5)


def test_a_novel_class_in_training_data_is_refused():
    with pytest.raises(ValueError, match="novel class"):
        EvalPlan.build(PARTITION, TRAIN, TEST, np.array([1, 2]))


def test_without_novel_classes_the_plan_has_no_base_novel():
    out = evaluate_clients(torch.eye(E), TEST, EvalPlan.build(PARTITION, TRAIN, TEST))
    assert not {"base", "novel", "hm"} & set(out)


def test_held_out_domain_scores_every_class_of_that_domain():
    test = Features(TEST.features, TEST.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    plan = EvalPlan.build(PARTITION, TRAIN, test, held_out_domains=np.array([1]))
    assert plan.shared["held_out_domain"].index.tolist() == [3, 4, 5]
    assert plan.shared["held_out_domain"].classes is None
    text = torch.eye(E)
    text[3] = 0  # class 3 can never win
    out = evaluate_clients(text, test, plan)
    assert out["held_out_domain"] == pytest.approx(1 / 3)


def test_average_rounds_is_a_per_client_mean_skipping_missing_scores():
    rounds = [
        {"local": [0.2, 0.4], "novel": [None, 0.1], "hm": [0.0, 0.0]},
        {"local": [0.4, 0.8], "novel": [0.5, 0.3], "hm": [0.0, 0.0]},
    ]
    out = average_rounds(rounds)
    assert out["local"] == pytest.approx([0.3, 0.6]) and out["novel"] == pytest.approx([0.5, 0.2])
    assert "hm" not in out  # recomputed from the averaged scores by summarize
