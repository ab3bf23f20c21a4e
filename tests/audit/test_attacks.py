"""Membership-inference attacks on simulated model outputs with known (or no) leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from pfpl.audit.attacks import (
    ShadowModelAttack,
    calibrated_loss_scores,
    lira_offline,
    lira_online,
    loss_threshold_scores,
    scaled_logit,
    split_members,
    split_shadow_conf,
)
from pfpl.audit.metrics import empirical_epsilon, roc_auc


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The attack's logistic regressions are tiny; on a shared 2-core machine torch's intra-op
    threads contend with other jobs and make LBFGS ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _world(shift: float, seed: int = 0, n: int = 2000, n_shadows: int = 50, difficulty: float = 2.0) -> dict:
    """Scaled logits φ = d_i + shift·member + N(0, 1): per-example difficulty d_i ~ N(0, difficulty²)
    is shared by every model, membership adds ``shift``. Target membership and each shadow's are
    independent fair coins per example."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, difficulty, n)
    keep = rng.random((n_shadows, n)) < 0.5
    member = rng.random(n) < 0.5
    shadow = d + shift * keep + rng.normal(size=(n_shadows, n))
    target = d + shift * member + rng.normal(size=n)
    return {"target": target, "member": member, "shadow": shadow, "keep": keep}


def _binary_logits(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-class logits [φ, 0] with label 0, whose scaled logit is exactly φ."""
    return np.stack([phi, np.zeros_like(phi)], -1), np.zeros(phi.shape[-1], dtype=np.int64)


def _all_scores(w: dict) -> dict[str, np.ndarray]:
    s_in, s_out = split_shadow_conf(w["shadow"], w["keep"])
    logits, labels = _binary_logits(w["target"])
    ref, _ = _binary_logits(np.where(w["keep"], np.nan, w["shadow"]))
    return {
        "loss": loss_threshold_scores(logits, labels),
        "calibrated": calibrated_loss_scores(logits, labels, ref),
        "lira_global": lira_online(w["target"], s_in, s_out, "global"),
        "lira_per_example": lira_online(w["target"], s_in, s_out, "per_example"),
        "lira_offline": lira_offline(w["target"], s_out),
    }


# --- building blocks ------------------------------------------------------------------------------


def test_scaled_logit_is_stable_logit_of_true_class_probability():
    torch.manual_seed(0)
    z, y = torch.randn(3, 6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    p = z.softmax(-1).gather(-1, y.expand(3, 6)[..., None]).squeeze(-1)
    phi = scaled_logit(z, y)  # broadcasts over a leading shadow axis
    assert phi.shape == (3, 6)
    np.testing.assert_allclose(phi, (p.log() - (1 - p).log()).numpy(), rtol=1e-10)
    # p_y rounds to 1 in float: the naive form is inf, the logsumexp form is exact.
    far = scaled_logit(torch.tensor([[200.0, 0.0, 0.0]]), [0])
    assert far[0] == pytest.approx(200 - np.log(2))


def test_loss_scores_are_negative_cross_entropy_and_calibration_subtracts_reference_mean():
    torch.manual_seed(1)
    z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    np.testing.assert_allclose(
        loss_threshold_scores(z, y), -F.cross_entropy(z, y, reduction="none").double(), rtol=1e-6
    )
    ref = torch.randn(3, 4, 3, dtype=torch.float64)
    ref[0, 1] = float("nan")  # example 1 was a member of reference 0: skipped
    ref_loss = F.cross_entropy(ref.reshape(-1, 3), y.repeat(3), reduction="none").reshape(3, 4).numpy()
    expected = np.nanmean(ref_loss, 0) + loss_threshold_scores(z, y)
    np.testing.assert_allclose(calibrated_loss_scores(z, y, ref), expected, rtol=1e-6)
    ref[:, 2] = float("nan")
    with pytest.raises(ValueError, match="no reference"):
        calibrated_loss_scores(z, y, ref)


def test_lira_matches_hand_computed_gaussian_likelihood_ratio():
    s_in = np.array([[1.0, 5.0], [3.0, np.nan], [np.nan, 7.0]])
    s_out = np.array([[0.0, np.nan], [2.0, 0.0], [np.nan, 4.0]])
    x = np.array([2.0, 6.0])
    # per-example: in (2, var 2) and (6, var 2); out (1, var 2) and (2, var 8)
    per = lira_online(x, s_in, s_out, "per_example")
    assert per[0] == pytest.approx(stats.norm.logpdf(2, 2, 2**0.5) - stats.norm.logpdf(2, 1, 2**0.5))
    assert per[1] == pytest.approx(stats.norm.logpdf(6, 6, 2**0.5) - stats.norm.logpdf(6, 2, 8**0.5))
    # global: out variance pooled as (2 + 8) / 2 = 5 — within-example spread, not across examples
    glob = lira_online(x, s_in, s_out, "global")
    assert glob[1] == pytest.approx(stats.norm.logpdf(6, 6, 2**0.5) - stats.norm.logpdf(6, 2, 5**0.5))
    off = lira_offline(x, s_out, "per_example")
    np.testing.assert_allclose(off, stats.norm.logcdf(x, [1, 2], [2**0.5, 8**0.5]))
    with pytest.raises(ValueError, match="no shadow_in_conf"):
        lira_online(x, np.full((2, 2), np.nan), s_out)


# --- known leakage and no leakage -----------------------------------------------------------------


def test_attacks_detect_known_leakage_and_lira_beats_loss_when_difficulty_varies():
    w = _world(shift=2.0)
    auc = {k: roc_auc(v, w["member"]) for k, v in _all_scores(w).items()}
    assert auc["lira_global"] > 0.85 and auc["lira_per_example"] > 0.85 and auc["lira_offline"] > 0.85
    assert auc["loss"] > 0.6
    assert min(auc["lira_global"], auc["lira_offline"], auc["calibrated"]) > auc["loss"] + 0.05
    eps = empirical_epsilon(_all_scores(w)["lira_global"], w["member"], delta=1e-5)
    assert eps["eps_lower_bound"] > 0.5


def test_no_leakage_gives_chance_auc_and_zero_epsilon_for_every_attack():
    for seed in range(2):
        w = _world(shift=0.0, seed=seed)
        for name, scores in _all_scores(w).items():
            assert abs(roc_auc(scores, w["member"]) - 0.5) < 0.06, name
            assert empirical_epsilon(scores, w["member"], delta=1e-5)["eps_lower_bound"] == 0.0, name


def _softmax_world(shift: float, seed: int = 0, n: int = 2000, n_shadows: int = 8, n_classes: int = 5) -> dict:
    """Class logits N(0, 1) except the true class, 1 + d_i + shift·member + N(0, 1)."""
    rng = np.random.default_rng(seed)
    d, labels = rng.normal(size=n), rng.integers(0, n_classes, n)

    def probs(member: np.ndarray) -> torch.Tensor:
        z = rng.normal(size=(*member.shape, n_classes))
        true = 1 + d + shift * member + rng.normal(size=member.shape)
        np.put_along_axis(z, np.broadcast_to(labels, member.shape)[..., None], true[..., None], -1)
        return torch.from_numpy(z).softmax(-1)

    keep, member = rng.random((n_shadows, n)) < 0.5, rng.random(n) < 0.5
    return {
        "shadow_probs": probs(keep).reshape(-1, n_classes),
        "shadow_labels": np.tile(labels, n_shadows),
        "shadow_member": keep.reshape(-1),
        "probs": probs(member),
        "labels": labels,
        "member": member,
    }


@pytest.mark.parametrize("shift", [2.0, 0.0])
def test_shadow_model_attack(shift: float):
    w = _softmax_world(shift)
    attack = ShadowModelAttack().fit(w["shadow_probs"], w["shadow_labels"], w["shadow_member"])
    assert attack.per_class == [0, 1, 2, 3, 4]
    scores = attack.scores(w["probs"], w["labels"])
    auc = roc_auc(scores, w["member"])
    if shift:
        assert auc > 0.7
    else:
        assert abs(auc - 0.5) < 0.06
        assert empirical_epsilon(scores, w["member"], delta=1e-5)["eps_lower_bound"] == 0.0


def test_shadow_model_attack_falls_back_to_global_model_for_rare_classes():
    w = _softmax_world(2.0, n=600, n_shadows=4)
    rare = w["shadow_labels"] == 4
    keep = ~rare | (np.arange(rare.size) % 50 == 0)  # class 4: a handful of shadow rows
    attack = ShadowModelAttack(min_per_class=20).fit(
        w["shadow_probs"][torch.from_numpy(keep)], w["shadow_labels"][keep], w["shadow_member"][keep]
    )
    assert attack.per_class == [0, 1, 2, 3]
    scores = attack.scores(w["probs"], w["labels"])
    assert np.isfinite(scores).all()
    assert roc_auc(scores[w["labels"] == 4], w["member"][w["labels"] == 4]) > 0.6
    with pytest.raises(RuntimeError):
        ShadowModelAttack().scores(w["probs"], w["labels"])


# --- membership labelling -------------------------------------------------------------------------


def test_split_members_draws_disjoint_sets_from_one_pool():
    members, nonmembers = split_members(1000, 400, seed=0)
    assert len(members) == 400 and len(nonmembers) == 600
    assert np.intersect1d(members, nonmembers).size == 0
    assert np.union1d(members, nonmembers).tolist() == list(range(1000))
    again = split_members(1000, 400, seed=0)
    assert np.array_equal(again[0], members) and np.array_equal(again[1], nonmembers)
    assert not np.array_equal(split_members(1000, 400, seed=1)[0], members)
    # The audit's labels come from the split, so a removed (held-out) sample can never be a "member".
    is_member = np.zeros(1000, bool)
    is_member[members] = True
    assert not is_member[nonmembers].any() and is_member[members].all()
    with pytest.raises(ValueError):
        split_members(10, 6, seed=0, n_nonmembers=5)


def test_split_members_stratified_gives_equal_label_distribution():
    rng = np.random.default_rng(0)
    labels = rng.choice(10, size=1000, p=np.r_[0.3, np.full(9, 0.7 / 9)])
    members, nonmembers = split_members(1000, 300, seed=0, n_nonmembers=300, labels=labels)
    assert len(members) == len(nonmembers) == 300 and np.intersect1d(members, nonmembers).size == 0
    counts_in = np.bincount(labels[members], minlength=10)
    counts_out = np.bincount(labels[nonmembers], minlength=10)
    assert np.abs(counts_in - counts_out).max() <= 1
    expected = 300 * np.bincount(labels, minlength=10) / 1000
    assert np.abs(counts_in - expected).max() < 1
    # An unbalanced request still fills exactly and stays disjoint.
    m, nm = split_members(1000, 700, seed=3, labels=labels)
    assert len(m) == 700 and len(nm) == 300 and np.intersect1d(m, nm).size == 0
