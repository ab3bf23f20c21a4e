"""Membership-inference attacks on a released prompt, from model outputs only.

Every attack maps the released model's outputs (logits or probabilities over the class prompts) on
candidate examples to membership scores, "higher = more likely a member", ready for
:mod:`pfpl.audit.metrics`. Training the target and shadow prompts is the caller's job.
Inputs may be numpy arrays or torch tensors; scores come back as float64 numpy arrays.

Shadow arrays have shape ``[n_shadows, n_examples]`` and hold NaN wherever the example did not
play that role (in / out) for that shadow model: with random per-example membership each example
is "in" for about half of the shadows (Carlini et al. 2022).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

Variance = Literal["global", "per_example"]


def _tensor(x: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --- membership labelling -------------------------------------------------------------------------


def _proportional(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder, exact sum)."""
    raw = total * sizes / sizes.sum()
    out = np.floor(raw).astype(int)
    out[np.argsort(-(raw - out), kind="stable")[: total - out.sum()]] += 1
    return out


def split_members(
    n: int, n_members: int, seed: int, n_nonmembers: int | None = None, labels: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw disjoint member and non-member index sets from one pool of ``n`` examples.

    Members are the examples the target prompt trains on; non-members are held out from the same
    pool, so they share its distribution and only membership differs. The sets are disjoint by
    construction: the published DP-FPL code labels samples it removed from training as members,
    which this makes impossible. ``n_nonmembers`` defaults to the rest of the pool. With ``labels``
    the split is stratified by class, so members and non-members have the same label distribution
    (up to rounding) and an attack cannot score on the class alone.
    """
    n_nonmembers = n - n_members if n_nonmembers is None else n_nonmembers
    if n_members < 0 or n_nonmembers < 0 or n_members + n_nonmembers > n:
        raise ValueError(f"cannot draw {n_members} members and {n_nonmembers} non-members from {n}")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[:n_members]), np.sort(perm[n_members : n_members + n_nonmembers])
    labels = _array(labels).astype(np.int64).reshape(-1)
    if labels.size != n:
        raise ValueError(f"labels has {labels.size} entries, expected {n}")
    classes, sizes = np.unique(labels, return_counts=True)
    k_in = _proportional(n_members, sizes)
    k_out = np.minimum(_proportional(n_nonmembers, sizes), sizes - k_in)
    short = n_nonmembers - k_out.sum()  # rounding can overfill a class; take the rest where room is
    while short > 0:
        i = int(np.argmax(sizes - k_in - k_out))
        take = min(short, int(sizes[i] - k_in[i] - k_out[i]))
        k_out[i] += take
        short -= take
    members, nonmembers = [], []
    for c, a, b in zip(classes, k_in, k_out):
        idx = rng.permutation(np.flatnonzero(labels == c))
        members.append(idx[:a])
        nonmembers.append(idx[a : a + b])
    return np.sort(np.concatenate(members)), np.sort(np.concatenate(nonmembers))


def split_shadow_conf(shadow_conf: Any, shadow_is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[n_shadows, n_examples]`` values and membership → (in, out) arrays with NaN elsewhere."""
    conf, keep = _array(shadow_conf), np.asarray(_array(shadow_is_member), dtype=bool)
    if conf.shape != keep.shape:
        raise ValueError(f"shadow_conf {conf.shape} and shadow_is_member {keep.shape} differ")
    return np.where(keep, conf, np.nan), np.where(~keep, conf, np.nan)


# --- loss attacks ---------------------------------------------------------------------------------


def _ce(logits: Any, labels: Any) -> torch.Tensor:
    """Per-example cross-entropy for logits ``[..., n, C]`` and labels ``[n]``."""
    z = _tensor(logits)
    y = _tensor(labels, torch.long).expand(z.shape[:-1])
    return torch.logsumexp(z, -1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def loss_threshold_scores(logits: Any, labels: Any) -> np.ndarray:
    """Negative cross-entropy of the true label (Yeom et al. 2018): training lowers members' loss."""
    return (-_ce(logits, labels)).numpy()


def calibrated_loss_scores(target_logits: Any, labels: Any, reference_logits: Any) -> np.ndarray:
    """Loss attack calibrated per example (Watson et al. 2022): mean reference loss − target loss.

    Hard examples have high loss whether or not they were trained on; subtracting the loss the same
    example gets under reference models that did not train on it removes that difficulty.
    ``reference_logits`` is ``[n_ref, n, C]``; NaN logits mark references for which the example was
    a member (they are skipped). Every example needs at least one reference."""
    ref = _ce(reference_logits, labels).numpy()
    if ref.ndim != 2:
        raise ValueError(f"reference_logits must be [n_ref, n, C], got loss shape {ref.shape}")
    if np.isnan(ref).all(0).any():
        raise ValueError(f"{int(np.isnan(ref).all(0).sum())} examples have no reference model")
    return np.nanmean(ref, 0) - _ce(target_logits, labels).numpy()


# --- LiRA -----------------------------------------------------------------------------------------


def scaled_logit(logits: Any, labels: Any) -> np.ndarray:
    """LiRA's confidence φ = log p_y − log(1 − p_y) = z_y − logsumexp_{j≠y} z_j (Carlini et al. 2022).

    The logit of p_y is close to Gaussian across models, where p_y itself is not; computing it from
    logits keeps it finite when p_y rounds to 1. Logits ``[..., n, C]``, labels ``[n]``."""
    z = _tensor(logits)
    y = _tensor(labels, torch.long).expand(z.shape[:-1]).unsqueeze(-1)
    zy = z.gather(-1, y).squeeze(-1)
    others = z.scatter(-1, y, float("-inf"))
    return (zy - torch.logsumexp(others, -1)).numpy()


def _gaussian(values: np.ndarray, variance: Variance, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation of NaN-masked ``[n_shadows, n]`` values.

    ``global``: one variance pooled over examples (within-example deviations, Σ(x − μ_i)² / Σ(k_i − 1)),
    which Carlini et al. recommend with few shadow models. ``per_example``: each example's own
    variance; examples with fewer than two values fall back to the pooled one."""
    if values.ndim != 2:
        raise ValueError(f"{name} must be [n_shadows, n_examples], got {values.shape}")
    count = (~np.isnan(values)).sum(0)
    if (count == 0).any():
        raise ValueError(f"{int((count == 0).sum())} examples have no {name} value")
    mean = np.nanmean(values, 0)
    ss = np.nansum((values - mean) ** 2, 0)
    dof = np.maximum(count - 1, 0)
    if dof.sum() == 0:
        raise ValueError(f"{name}: need two values for some example to estimate a variance")
    pooled = ss.sum() / dof.sum()
    if variance == "global":
        var = np.full(mean.shape, pooled)
    elif variance == "per_example":
        var = np.where(dof > 0, ss / np.maximum(dof, 1), pooled)
    else:
        raise ValueError(f"variance must be 'global' or 'per_example', got {variance!r}")
    return mean, np.sqrt(np.maximum(var, 1e-12))


def lira_online(
    target_conf: Any, shadow_in_conf: Any, shadow_out_conf: Any, variance: Variance = "global"
) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022): log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out).

    Per-example Gaussians fitted to shadow models that did / did not train on the example test
    membership against that example's own difficulty. ``target_conf`` is φ = :func:`scaled_logit`
    of the released prompt, ``[n]``; shadows are ``[n_shadows, n]`` with NaN where not in the role.
    """
    x = _array(target_conf).reshape(-1)
    mu_in, sd_in = _gaussian(_array(shadow_in_conf), variance, "shadow_in_conf")
    mu_out, sd_out = _gaussian(_array(shadow_out_conf), variance, "shadow_out_conf")
    if not mu_in.shape == mu_out.shape == x.shape:
        raise ValueError(f"target {x.shape}, shadow in {mu_in.shape} and out {mu_out.shape} differ")
    return stats.norm.logpdf(x, mu_in, sd_in) - stats.norm.logpdf(x, mu_out, sd_out)


def lira_offline(target_conf: Any, shadow_out_conf: Any, variance: Variance = "global") -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): one-sided test against the out-distribution only.

    Score log Φ((φ − μ_out)/σ_out) = log P(Z ≤ φ), Z ~ N(μ_out, σ_out²): how far above what
    non-member shadows give the example the target's confidence lies. Needs no shadow trained on the
    target examples, so shadows can be trained once before the audit set is chosen."""
    x = _array(target_conf).reshape(-1)
    mu_out, sd_out = _gaussian(_array(shadow_out_conf), variance, "shadow_out_conf")
    if mu_out.shape != x.shape:
        raise ValueError(f"target {x.shape} and shadow out {mu_out.shape} differ")
    return stats.norm.logcdf(x, mu_out, sd_out)


# --- shadow-model attack --------------------------------------------------------------------------


class ShadowModelAttack:
    """Shokri et al. (2017) shadow-model attack, the one DP-FPL reports.

    One attack classifier per class, trained on shadow models' outputs with known membership;
    classes with fewer than ``min_per_class`` shadow members or non-members use a global model
    trained on all classes. Features: the top-``top_k`` sorted probabilities and the true-label
    probability, as logs plus log(1 − p_y) (probabilities of trained examples crowd near 1, where a
    linear model on raw values sees no difference). The classifier is L2-regularised logistic
    regression fitted full-batch with LBFGS on standardised features, with members and non-members
    weighted equally so a class's shadow membership rate does not shift its scores. Scores are the
    classifier's log-odds.
    """

    def __init__(self, top_k: int = 3, min_per_class: int = 20, l2: float = 1e-3, max_iter: int = 100) -> None:
        self.top_k, self.min_per_class, self.l2, self.max_iter = top_k, min_per_class, l2, max_iter
        self._models: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mean = self._std = torch.zeros(0)

    def _features(self, probs: Any, labels: Any) -> torch.Tensor:
        p = _tensor(probs)
        y = _tensor(labels, torch.long)
        if p.ndim != 2 or y.shape != p.shape[:1]:
            raise ValueError(f"probs must be [n, C] with labels [n], got {tuple(p.shape)} and {tuple(y.shape)}")
        p = p.clamp(1e-12, 1.0)
        top = p.sort(-1, descending=True).values[:, : min(self.top_k, p.shape[1])]
        py = p.gather(1, y[:, None])
        return torch.cat([top.log(), py.log(), (1 - py).clamp_min(1e-12).log()], 1)

    def _fit_lr(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
        b = torch.zeros((), dtype=x.dtype, requires_grad=True)
        weight = torch.where(m, 0.5 / m.sum(), 0.5 / (~m).sum())
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (weight * F.binary_cross_entropy_with_logits(x @ w + b, m.to(x.dtype), reduction="none")).sum()
            loss = loss + self.l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def fit(self, shadow_probs: Any, shadow_labels: Any, shadow_is_member: Any) -> ShadowModelAttack:
        """Train on shadow outputs ``[n, C]`` (rows from all shadow models stacked), labels ``[n]``."""
        x = self._features(shadow_probs, shadow_labels)
        y = _tensor(shadow_labels, torch.long)
        m = _tensor(shadow_is_member, torch.bool).reshape(-1)
        if m.shape != y.shape:
            raise ValueError(f"shadow_is_member has {m.numel()} entries, expected {y.numel()}")
        if m.all() or not m.any():
            raise ValueError("shadow data needs both members and non-members")
        self._mean, self._std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self._mean) / self._std
        self._global = self._fit_lr(x, m)
        self._models = {}
        for c in torch.unique(y).tolist():
            sel = y == c
            if min(int(m[sel].sum()), int((~m[sel]).sum())) >= self.min_per_class:
                self._models[c] = self._fit_lr(x[sel], m[sel])
        return self

    @property
    def per_class(self) -> list[int]:
        """Classes with their own attack model (the rest use the global one)."""
        return sorted(self._models)

    def scores(self, target_probs: Any, target_labels: Any) -> np.ndarray:
        """Membership log-odds for the released model's probabilities ``[n, C]`` on labelled examples."""
        if self._global is None:
            raise RuntimeError("call fit() first")
        x = (self._features(target_probs, target_labels) - self._mean) / self._std
        y = _tensor(target_labels, torch.long)
        w, b = self._global
        out = x @ w + b
        for c, (wc, bc) in self._models.items():
            sel = y == c
            out[sel] = x[sel] @ wc + bc
        return out.numpy()
