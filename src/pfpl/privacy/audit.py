"""Membership-inference audits of released prompts (``pfpl audit``).

The threat model and the protocol are documented in ``docs/audit.md``; in short:

* **target**: one client's *released* prompt (global + local parts, the context a public user of
  the prompt would hold, ``prompts-<method>.pt["context"][client]``), queried for its class
  probabilities on candidate records;
* **members**: that client's training records (all of them, or a random subset), from the train
  split; **non-members**: records of the *same* (class, domain) pairs, equal in number pair by pair,
  from a held-out split (``val`` by default) that no model ever trained on. Membership is the only
  difference. Members whose pair has no held-out record left are dropped, never relabelled;
* **LiRA shadows** (``K`` per target client) train on stratified random halves of
  (members ∪ non-members), in complementary pairs, so every audited record is "in" for half the
  shadows and "out" for the other half (Carlini et al. 2022); they give the online / offline LiRA
  Gaussians and the references of the calibrated loss attack;
* **Shokri shadows** (``K_s`` per target client) train on stratified halves of a *shadow pool*: held-
  out records of the same pairs from a third split (``test`` by default), disjoint from members and
  non-members; the DP-FPL shadow-model attack's classifiers learn from their outputs only.

Every shadow is trained the way the target client trained its part of the released prompt: the
target's method, hyper-parameters, rounds, local steps, batch size and DP mechanism (same σ and
clip, Poisson sampling when the run used it), starting from a fresh initialisation, with the
*released* global prompt fixed (``EngineSettings.train_global = False``) so a shadow learns only the
personal part on top of it. Global-only methods (PromptFL) have no personal part: their shadows
fine-tune a private copy of the released global prompt with the learning rate scaled by the target
client's aggregation weight n_i / Σn, a first-order model of that client's share of the global
update (documented as an approximation). All shadows of all audited clients of one method are the
clients of one vectorized :class:`~pfpl.federation.simulator.Simulator`.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pfpl.algorithms.base import Method, MethodSettings
from pfpl.algorithms.methods import METHODS
from pfpl.data.features import Features
from pfpl.federation.simulator import EngineSettings, Simulator
from pfpl.privacy.attacks import (
    ShadowModelAttack,
    calibrated_loss_scores,
    lira_offline,
    lira_online,
    loss_threshold_scores,
    scaled_logit,
    split_shadow_conf,
)
from pfpl.privacy.audit_metrics import summarize

ATTACKS = ("loss", "calibrated_loss", "lira_online", "lira_offline", "shadow_model")
NONMEMBER_SPLIT = "val"
SHADOW_SPLIT = "test"
MIN_SHADOWS = 4  # LiRA shadows per target: complementary pairs put every record in 2 and out of 2


class AuditError(ValueError):
    """A bad audit request (missing run folder, unknown method, too few shadows, …): one line."""


def check_shadows(k: int) -> None:
    if k < MIN_SHADOWS:
        raise AuditError(f"--shadows must be at least {MIN_SHADOWS} (LiRA fits per-record Gaussians: every record "
                         f"needs 2 shadows that trained on it and 2 that did not), got {k}")


# --- data: members, non-members, shadow pool -------------------------------------------------------

@dataclass
class AuditSets:
    """Indices of one target client's audit data: members into the train split, non-members into the
    held-out split, the shadow pool into the shadow split (which may be the held-out split itself;
    then the pool is drawn from what the non-members left)."""

    members: np.ndarray
    nonmembers: np.ndarray
    shadow_pool: np.ndarray
    dropped: int  # client records not audited: their (class, domain) pair has no held-out record left


def _keys(labels: Any, domains: Any, n_domains: int) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) * n_domains + np.asarray(domains, dtype=np.int64)


def matched_sets(client_index: Any, train: Features, heldout: Features, shadow: Features | None = None, *,
                 max_members: int | None = None, seed: int = 0) -> AuditSets:
    """Members, matched non-members and a disjoint shadow pool for one client.

    ``max_members`` first draws a random subset of the client's records. For every (class, domain)
    pair with k member candidates and h held-out records, min(k, h) of each are kept, so members and
    non-members have identical class and domain counts; up to 2·min(k, h) records of the pair form
    the shadow pool (from ``shadow``, or from the held-out records the non-members did not use when
    ``shadow`` is None).
    """
    rng = np.random.default_rng(seed)
    cand = np.asarray(client_index, dtype=np.int64).reshape(-1)
    if max_members is not None and max_members < len(cand):
        cand = np.sort(rng.choice(cand, size=max_members, replace=False))
    n_dom = 1 + max(int(f.domains.max()) for f in (train, heldout, shadow) if f is not None and len(f))
    mkey = _keys(train.labels[cand].numpy(), train.domains[cand].numpy(), n_dom)
    hkey = _keys(heldout.labels.numpy(), heldout.domains.numpy(), n_dom)
    skey = _keys(shadow.labels.numpy(), shadow.domains.numpy(), n_dom) if shadow is not None else None
    members, nonmembers, pool = [], [], []
    for key in np.unique(mkey):
        mine = rng.permutation(cand[mkey == key])
        held = rng.permutation(np.flatnonzero(hkey == key))
        k = min(len(mine), len(held))
        members.append(mine[:k])
        nonmembers.append(held[:k])
        if skey is None:
            pool.append(held[k:k + 2 * k])
        else:
            pool.append(rng.permutation(np.flatnonzero(skey == key))[:2 * k])
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    members, nonmembers, pool = cat(members), cat(nonmembers), cat(pool)
    return AuditSets(members, nonmembers, pool, dropped=len(cand) - len(members))


def half_splits(keys: np.ndarray, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_models, n]`` boolean training membership: stratified random halves in complementary pairs.

    Models 2j and 2j+1 split every group of equal ``keys`` between them (odd groups give the extra
    record to either at random), so every record is "in" for exactly half of each pair; an odd last
    model takes a fresh random half."""
    keys = np.asarray(keys)
    out = np.zeros((n_models, len(keys)), dtype=bool)
    for j in range(0, n_models, 2):
        first = np.zeros(len(keys), dtype=bool)
        for key in np.unique(keys):
            idx = rng.permutation(np.flatnonzero(keys == key))
            take = len(idx) // 2 + (len(idx) % 2 and rng.random() < 0.5)
            first[idx[:take]] = True
        out[j] = first
        if j + 1 < n_models:
            out[j + 1] = ~first
    return out


# --- shadow training -------------------------------------------------------------------------------

@dataclass
class ShadowTraining:
    """How the target client trained its part of the released prompt; shadows repeat it."""

    method: str
    engine: EngineSettings  # the target run's settings, with ``local_steps`` resolved (not 0)
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    dp: Any = None  # the run's DPConfig (None or mode 'off': no DP)
    noise_multiplier: float | None = None  # σ the run used (feature / per-sample); None: calibrate from dp
    released: dict[str, torch.Tensor] = field(default_factory=dict)  # the run's params; global ones are fixed
    global_weight: float = 1.0  # the target client's share n_i / Σn of the global aggregate


@dataclass
class AuditTarget:
    """One client's released prompt and its audit records."""

    client: int
    context: torch.Tensor  # [M, D] the released context
    members: Features
    nonmembers: Features
    shadow_pool: Features | None = None
    accountant_epsilon: float = math.inf
    dropped: int = 0


class PersonalCopy(Method):
    """A global-only method's parameters as per-shadow copies, initialised to the released values."""

    def __init__(self, base: Method, released: dict[str, torch.Tensor]):
        super().__init__(base.settings)
        self.base, self.released = base, {k: released[k] for k in base.global_params}
        self.name = base.name
        self.global_params = ()
        self.local_params = tuple(base.global_params) + tuple(base.local_params)
        self.private_leaves = base.private_leaves

    def init(self, n_clients, n_ctx, dim, gen):
        return {k: v.detach().expand(n_clients, *v.shape).clone() for k, v in self.released.items()}

    def views(self, params, gen):
        return self.base.views(params, gen)

    def param_grads(self, views, leaf_grads):
        return self.base.param_grads(views, leaf_grads)

    def extra_loss(self, views, text_features, tower, reference):
        return self.base.extra_loss(views, text_features, tower, reference)


def _shadow_dp(dp: Any, sigma: float | None) -> Any:
    if dp is None:
        return None
    if dp.mode in ("feature", "per-sample") and sigma is not None:
        return dp.model_copy(update={"target_epsilon": None, "noise_multiplier": float(sigma)})
    return dp


def shadow_simulator(training: ShadowTraining, tower, data: Features, clients: list[np.ndarray], scale: float,
                     reference: torch.Tensor | None, seed: int) -> tuple[Simulator, Any]:
    """One simulator whose clients are shadows: fresh personal parts on the fixed released global;
    returns it with its privacy plan (None without DP)."""
    from pfpl.privacy.mechanisms import build_privacy

    base = METHODS[training.method](training.method_settings)
    lr = training.engine.lr
    if base.global_params and not base.local_params:
        missing = [k for k in base.global_params if k not in training.released]
        if missing:
            raise AuditError(f"method {training.method!r}: the released parameters lack {missing[0]!r}")
        method: Method = PersonalCopy(base, training.released)
        lr = lr * training.global_weight
    else:
        method = base
    engine = replace(training.engine, participation=1.0, lr=lr, seed=seed, train_global=False, sampling="shuffle")
    sim = Simulator(method, tower, data, clients, engine, scale, reference)
    for name in method.global_params:
        if name not in training.released:
            raise AuditError(f"method {training.method!r}: the released parameters lack {name!r}")
        sim.params[name] = training.released[name].detach().clone()
    dp = _shadow_dp(training.dp, training.noise_multiplier)
    plan = build_privacy(sim, dp, engine.rounds, training.method) if dp is not None else None
    return sim, plan


def _logits(scale: float, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[..., C, E]`` text features × ``[n, E]`` image features → ``[..., n, C]`` logits (float64)."""
    text = text.to(feats.device, torch.float64)
    return scale * torch.einsum("ne,...ce->...nc", feats.to(torch.float64), text)


def _finite(x: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)


# --- the audit -------------------------------------------------------------------------------------

@dataclass
class AuditResult:
    report: dict  # JSON-ready: pooled and per-client attack summaries
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # attack → (pooled scores, is_member)


def _json_eps(x: float) -> float | None:
    return None if math.isinf(x) else float(x)


def _summaries(scores: dict[str, np.ndarray], is_member: np.ndarray, delta: float, confidence: float,
               accountant: float) -> dict:
    out = {}
    for name, s in scores.items():
        row = summarize(s, is_member, delta, confidence)
        row["exceeds_accountant"] = bool(row["eps_lower_bound"] > accountant)
        out[name] = row
    return out


def audit_targets(tower, scale: float, training: ShadowTraining, targets: list[AuditTarget], *,
                  shadows: int = 8, shokri_shadows: int | None = None, seed: int = 0, delta: float = 1e-5,
                  confidence: float = 0.95, reference: torch.Tensor | None = None,
                  log: Callable[[str], None] | None = None) -> AuditResult:
    """Train the shadows of every target (one simulator), score every attack, summarise.

    ``shadows`` (K ≥ 4) LiRA shadows per target train on stratified halves of its members ∪
    non-members; ``shokri_shadows`` (default max(2, K // 2); 0 disables the shadow-model attack)
    train on halves of its shadow pool. Scores of all targets are pooled per attack (one ROC over
    every audited record) and also summarised per client.
    """
    check_shadows(shadows)
    if not targets:
        raise AuditError("no target clients to audit")
    k_s = max(2, shadows // 2) if shokri_shadows is None else shokri_shadows
    if k_s == 1:
        raise AuditError("the shadow-model attack needs at least 2 shadows (or 0 to skip it)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA0D1]))
    feats, labels, domains, clients = [], [], [], []
    # per target: (offset of its audit records, their number, LiRA in-mask, offset of its pool, pool mask or None)
    plan = []
    offset = 0
    n_dom = 1 + max(int(f.domains.max()) for t in targets for f in (t.members, t.nonmembers, t.shadow_pool)
                    if f is not None and len(f))
    for t in targets:
        if len(t.members) == 0 or len(t.nonmembers) == 0:
            raise AuditError(f"client {t.client}: no members or no non-members to audit")
        audit = Features(torch.cat([t.members.features, t.nonmembers.features]),
                         torch.cat([t.members.labels, t.nonmembers.labels]),
                         torch.cat([t.members.domains, t.nonmembers.domains]))
        keys = _keys(audit.labels.numpy(), audit.domains.numpy(), n_dom)
        in_mask = half_splits(keys, shadows, rng)
        a_off = offset
        feats.append(audit.features), labels.append(audit.labels), domains.append(audit.domains)
        offset += len(audit)
        clients += [a_off + np.flatnonzero(m) for m in in_mask]
        pool = t.shadow_pool if k_s > 0 and t.shadow_pool is not None and len(t.shadow_pool) >= 2 else None
        p_off, pool_mask = offset, None
        if pool is not None:
            pool_mask = half_splits(_keys(pool.labels.numpy(), pool.domains.numpy(), n_dom), k_s, rng)
            feats.append(pool.features), labels.append(pool.labels), domains.append(pool.domains)
            offset += len(pool)
            clients += [p_off + np.flatnonzero(m) for m in pool_mask]
        plan.append((a_off, len(audit), in_mask, p_off, pool_mask))
    data = Features(torch.cat(feats), torch.cat(labels), torch.cat(domains))
    sizes = [len(c) for c in clients]
    if min(sizes) == 0:
        raise AuditError("a shadow got no training records; audit more records per client")
    shadow_seed = int(np.random.SeedSequence([seed, training.engine.seed, 0x5AD0]).generate_state(1)[0] % 2**31)
    sim, dp_plan = shadow_simulator(training, tower, data, clients, scale, reference, shadow_seed)
    t0 = time.time()
    while sim.round < sim.s.rounds:
        sim.run_round()
        if log:
            log(f"{training.method}: shadow round {sim.round}/{sim.s.rounds} ({len(clients)} shadows)")
    with torch.no_grad():
        shadow_text = sim.text_features()
        target_text = tower(torch.stack([t.context for t in targets])[:, None])
    pooled: dict[str, list[np.ndarray]] = {}
    pooled_member: list[np.ndarray] = []
    per_client = {}
    row = 0
    for i, (t, (a_off, n_a, in_mask, p_off, pool_mask)) in enumerate(zip(targets, plan)):
        x = data.features[a_off:a_off + n_a]
        y = data.labels[a_off:a_off + n_a]
        is_member = np.r_[np.ones(len(t.members), bool), np.zeros(len(t.nonmembers), bool)]
        target_logits = _logits(scale, x, target_text[i])  # [n, C]
        lira_logits = _logits(scale, x, shadow_text[row:row + shadows])  # [K, n, C]
        row += shadows
        target_conf = scaled_logit(target_logits, y)
        shadow_conf = scaled_logit(lira_logits, y)
        conf_in, conf_out = split_shadow_conf(shadow_conf, in_mask)
        ref_logits = lira_logits.clone()
        ref_logits[torch.as_tensor(in_mask)] = float("nan")
        scores = {
            "loss": loss_threshold_scores(target_logits, y),
            "calibrated_loss": calibrated_loss_scores(target_logits, y, ref_logits),
            "lira_online": lira_online(target_conf, conf_in, conf_out, "global"),
            "lira_offline": lira_offline(target_conf, conf_out, "global"),
        }
        if pool_mask is not None:
            n_p = pool_mask.shape[1]
            xp, yp = data.features[p_off:p_off + n_p], data.labels[p_off:p_off + n_p]
            probs = torch.softmax(_logits(scale, xp, shadow_text[row:row + k_s]), -1)  # [K_s, n_p, C]
            row += k_s
            attack = ShadowModelAttack().fit(probs.reshape(-1, probs.shape[-1]), yp.repeat(k_s),
                                             torch.as_tensor(pool_mask.reshape(-1)))
            scores["shadow_model"] = attack.scores(torch.softmax(target_logits, -1), y)
        scores = {k: _finite(v) for k, v in scores.items()}
        for k, v in scores.items():
            pooled.setdefault(k, []).append(v)
        pooled_member.append(is_member)
        pred = target_logits.argmax(-1).numpy() == y.numpy()
        per_client[str(t.client)] = {
            "accountant_epsilon": _json_eps(t.accountant_epsilon),
            "n_members": int(is_member.sum()), "n_nonmembers": int((~is_member).sum()),
            "members_dropped": int(t.dropped),
            "member_accuracy": float(pred[is_member].mean()), "nonmember_accuracy": float(pred[~is_member].mean()),
            "attacks": _summaries(scores, is_member, delta, confidence, t.accountant_epsilon),
        }
    member = np.concatenate(pooled_member)
    # a pooled ROC needs every attack for every target: drop attacks some target lacks
    names = [k for k in ATTACKS if k in pooled and len(pooled[k]) == len(targets)]
    pooled_scores = {k: np.concatenate(pooled[k]) for k in names}
    eps_max = max(t.accountant_epsilon for t in targets)
    report = {
        "method": training.method,
        "clients": [t.client for t in targets],
        "accountant_epsilon": _json_eps(eps_max),
        "attacks": _summaries(pooled_scores, member, delta, confidence, eps_max),
        "per_client": per_client,
        "shadows": {"lira": shadows, "shadow_model": k_s if all(p[4] is not None for p in plan) else 0,
                    "design": "personal copy of the released global, lr x client weight"
                    if isinstance(sim.method, PersonalCopy) else "personal part on the fixed released global",
                    "rounds": sim.s.rounds, "local_steps": sim.local_steps,
                    "dp": dp_plan.describe() if dp_plan is not None else {"mode": "off"},
                    "seconds": round(time.time() - t0, 1)},
    }
    return AuditResult(report, {k: (pooled_scores[k], member) for k in names})


# --- auditing a run folder -------------------------------------------------------------------------

def _parse_clients(spec: Any, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    out = []
    for c in spec:
        if not 0 <= int(c) < n:
            raise AuditError(f"client {c} does not exist; the run has clients 0-{n - 1}")
        out.append(int(c))
    return sorted(set(out))


def load_run(run_dir: Path) -> tuple[Any, dict]:
    """The run's config and summary, or one clear error."""
    from pfpl.config import build_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"no run folder at {run_dir}")
    if not (run_dir / "config.json").is_file():
        raise AuditError(f"{run_dir} is not a pfpl run folder (no config.json)")
    if not (run_dir / "summary.json").is_file():
        raise AuditError(f"run {run_dir} has not finished (no summary.json); finish it with pfpl run --resume {run_dir}")
    cfg = build_config(json.loads((run_dir / "config.json").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    return cfg, summary


def audit_run(run_dir: Path, methods: list[str] | None = None, clients: list[int] | None = None, *,
              shadows: int = 8, shokri_shadows: int | None = None, max_members: int | None = None, seed: int = 0,
              confidence: float = 0.95, write: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Audit the released prompts of ``methods`` (default: all) for ``clients`` (default: all) of a
    finished run; writes ``audit.json`` and ``audit.png`` into the run folder."""
    from pfpl.data.features import image_features
    from pfpl.federation.runner import Benchmark, engine_settings, method_settings
    from pfpl.federation.simulator import steps_per_round

    run_dir = Path(run_dir)
    cfg, summary = load_run(run_dir)
    ran = list(summary.get("methods", {}))
    methods = ran if not methods else list(dict.fromkeys(methods))
    check_shadows(shadows)
    if max_members is not None and max_members < 1:
        raise AuditError(f"--members must be at least 1, got {max_members}")
    prompts = {}
    for m in methods:
        if m not in ran:
            raise AuditError(f"method {m!r} is not in run {run_dir} (it has: {', '.join(ran)})")
        if not (run_dir / f"prompts-{m}.pt").is_file():
            raise AuditError(f"run {run_dir} has no released prompts for {m!r} (prompts-{m}.pt)")
        prompts[m] = torch.load(run_dir / f"prompts-{m}.pt", map_location="cpu", weights_only=False)
        _parse_clients(clients, prompts[m]["context"].shape[0])  # fail before any work
    bench = Benchmark(cfg)
    heldout = image_features(bench.backbone, bench.dataset, NONMEMBER_SPLIT, cfg.cache_dir)
    shadow_split = image_features(bench.backbone, bench.dataset, SHADOW_SPLIT, cfg.cache_dir)
    engine = engine_settings(cfg)
    engine = replace(engine, local_steps=steps_per_round(bench.partition.sizes(), engine))
    sizes = np.asarray(bench.partition.sizes(), dtype=np.float64)
    report = {"run_dir": str(run_dir), "delta": cfg.dp.delta, "confidence": confidence, "seed": seed,
              "dp_mode": cfg.dp.mode, "target_epsilon": cfg.dp.target_epsilon if cfg.dp.mode != "off" else None,
              "protocol": {"members": "the target client's training records (train split)"
                                      + (f", a random {max_members} per client" if max_members else ""),
                           "nonmembers": f"{NONMEMBER_SPLIT} split records of the same (class, domain) pairs, "
                                         "equal numbers pair by pair",
                           "lira_shadows": "stratified complementary halves of members + non-members",
                           "shadow_model_pool": f"{SHADOW_SPLIT} split records of the same pairs, disjoint from "
                                                "members and non-members"},
              "methods": {}}
    for m in methods:
        result = summary["methods"][m]
        released = prompts[m]
        n_clients = released["context"].shape[0]
        chosen = _parse_clients(clients, n_clients)
        eps_per_client = result.get("epsilon_per_client") or [None] * n_clients
        privacy = result.get("privacy", {})
        sigma = privacy.get("noise_multiplier") if privacy.get("mode") in ("feature", "per-sample") else None
        training = ShadowTraining(method=m, engine=engine, method_settings=method_settings(cfg), dp=cfg.dp,
                                  noise_multiplier=sigma, released=released["params"])
        targets = []
        for c in chosen:
            index = released["clients"][c].numpy()
            sets = matched_sets(index, bench.train, heldout, shadow_split, max_members=max_members,
                                seed=int(np.random.SeedSequence([seed, c]).generate_state(1)[0] % 2**31))
            eps = eps_per_client[c]
            targets.append(AuditTarget(c, released["context"][c], bench.train.subset(sets.members),
                                       heldout.subset(sets.nonmembers), shadow_split.subset(sets.shadow_pool),
                                       math.inf if eps is None else float(eps), sets.dropped))
        # the global-only shadow's learning-rate factor: the audited clients' mean aggregation weight
        training.global_weight = float(np.mean([sizes[c] / sizes.sum() for c in chosen]))
        t0 = time.time()
        out = audit_targets(bench.tower, bench.backbone.logit_scale, training, targets, shadows=shadows,
                            shokri_shadows=shokri_shadows, seed=seed, delta=cfg.dp.delta, confidence=confidence,
                            reference=bench.reference, log=log)
        out.report.update(nominal=bool(privacy.get("nominal", False)), privacy_mode=privacy.get("mode", "off"),
                          seconds=round(time.time() - t0, 1))
        report["methods"][m] = out.report
    report["attacks"] = strongest(report["methods"])
    report["violations"] = violations(report["methods"])
    if write:
        from pfpl import artifacts

        artifacts.write_json(run_dir / "audit.json", report)
        plot_audit(run_dir / "audit.png", audit_rows([report]))
    return report


def strongest(methods: dict) -> dict:
    """Per attack, the audited method where it is strongest (highest AUC), with that method named."""
    out = {}
    for name in ATTACKS:
        rows = [(m, r["attacks"][name], r["accountant_epsilon"]) for m, r in methods.items() if name in r["attacks"]]
        if rows:
            m, row, eps = max(rows, key=lambda x: (x[1]["auc"], x[1]["eps_lower_bound"]))
            out[name] = {**row, "method": m, "accountant_epsilon": eps}
    return out


def violations(methods: dict) -> list[dict]:
    """Every (method, client or pooled, attack) whose ε lower bound exceeds the accountant's ε."""
    out = []
    for m, r in methods.items():
        for scope, attacks, eps in [("pooled", r["attacks"], r["accountant_epsilon"])] + \
                [(c, pc["attacks"], pc["accountant_epsilon"]) for c, pc in r["per_client"].items()]:
            for name, row in attacks.items():
                if row["exceeds_accountant"]:
                    out.append({"method": m, "scope": scope, "attack": name, "eps_lower_bound": row["eps_lower_bound"],
                                "accountant_epsilon": eps, "nominal": r.get("nominal", False)})
    return out


# --- several runs (an ε sweep) ---------------------------------------------------------------------

def run_dirs_of(path: Path) -> list[Path]:
    """A run folder itself, or the ``eps-*`` run folders of a sweep folder."""
    path = Path(path)
    if not path.is_dir():
        raise AuditError(f"no run folder at {path}")
    if (path / "config.json").is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not runs:
        raise AuditError(f"{path} is neither a pfpl run folder (no config.json) nor a sweep folder of runs")
    return runs


def audit_rows(reports: list[dict]) -> list[dict]:
    """Flat table rows: one per (run, method, attack)."""
    rows = []
    for rep in reports:
        for m, r in rep["methods"].items():
            for name, a in r["attacks"].items():
                rows.append({"run_dir": rep["run_dir"], "method": m, "attack": name,
                             "target_epsilon": rep.get("target_epsilon"),
                             "accountant_epsilon": r["accountant_epsilon"], "nominal": r.get("nominal", False),
                             **{k: a[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "accuracy",
                                                  "eps_lower_bound", "eps_point_estimate", "n_members",
                                                  "n_nonmembers")}})
    return rows


def audit_many(paths: list[Path], out_dir: Path | None = None, **kw) -> dict:
    """Audit every run (run folders or sweep folders); with several runs, write a combined
    ``audit.json`` / ``audit.png`` into ``out_dir`` (default: the sweep folder, if one was given)."""
    runs: list[Path] = []
    for p in paths:
        runs += run_dirs_of(p)
    for r in runs:  # fail before any training on a bad folder or method
        load_run(r)
    reports = [audit_run(r, **kw) for r in runs]
    if len(reports) == 1:
        return reports[0]
    combined = {"runs": {str(Path(r["run_dir"])): r for r in reports}, "table": audit_rows(reports),
                "violations": [dict(v, run_dir=r["run_dir"]) for r in reports for v in r["violations"]]}
    if out_dir is None and len(paths) == 1 and Path(paths[0]) not in runs:
        out_dir = Path(paths[0])
    if out_dir is not None:
        from pfpl import artifacts

        artifacts.write_json(Path(out_dir) / "audit.json", combined)
        plot_audit(Path(out_dir) / "audit.png", combined["table"])
        combined["out_dir"] = str(out_dir)
    return combined


def plot_audit(path: Path, rows: list[dict]) -> None:
    """AUC and TPR at 1% FPR against the accountant's ε, one line per method; each point is the best
    attack on that metric (max over attacks); ∞ (no DP) drawn at the right end; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pfpl import artifacts

    finite = [r["accountant_epsilon"] for r in rows if r["accountant_epsilon"] is not None]
    right = max(finite) * 4 if finite else 1.0
    x_of = lambda e: right if e is None else max(float(f"{float(e):.3g}"), 1e-3)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, m in enumerate(methods):
        for ax, key in zip(axes, ("auc", "tpr_at_1pct_fpr")):
            best: dict[str, dict] = {}
            for r in rows:
                if r["method"] == m and (r["run_dir"] not in best or r[key] > best[r["run_dir"]][key]):
                    best[r["run_dir"]] = r
            pts = sorted(best.values(), key=lambda r: x_of(r["accountant_epsilon"]))
            ax.plot([x_of(r["accountant_epsilon"]) for r in pts], [r[key] for r in pts], marker="o",
                    color=f"C{i}", label=m)
    ticks = sorted({x_of(r["accountant_epsilon"]) for r in rows})
    for ax, chance, title in ((axes[0], 0.5, "ROC AUC"), (axes[1], 0.01, "TPR at 1% FPR")):
        ax.axhline(chance, ls="--", color="gray", label="chance")
        ax.set_xscale("log")
        infinite = lambda t: t == right and not any(x_of(e) == t for e in finite)
        ax.set_xticks(ticks, ["∞" if infinite(t) else f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("accountant ε of the released prompt (∞ = no DP)")
        ax.set_title(f"{title} (best attack per point)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    artifacts.atomic_write_bytes(path, buf.getvalue())
