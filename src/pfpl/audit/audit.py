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
*released* global prompt fixed (``TrainSettings.train_shared = False``) so a shadow learns only the
personal part on top of it. Global-only methods (PromptFL) have no personal part: their shadows
fine-tune a private copy of the released global prompt with the learning rate scaled by the target
client's aggregation weight n_i / Σn, a first-order model of that client's share of the global
update (documented as an approximation). All shadows of all audited clients of one method are the
clients of one vectorized :class:`~pfpl.federation.simulator.Simulator`, built by the run's own
engine factory (:func:`~pfpl.federation.wiring.build_engine`) with the run's DP config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfpl.artifacts import ReleasedPrompts, RunFolder
from pfpl.audit import check_shadows
from pfpl.audit.attacks import (
    ShadowModelAttack,
    calibrated_loss_scores,
    lira_offline,
    lira_online,
    loss_threshold_scores,
    scaled_logit,
    split_shadow_conf,
)
from pfpl.audit.metrics import summarize
from pfpl.audit.report import ATTACKS, audit_rows, plot_audit, strongest, violations
from pfpl.audit.sets import half_splits, matched_sets, pair_keys
from pfpl.audit.shadows import AuditTarget, PersonalCopy, ShadowTraining, shadow_simulator
from pfpl.config import Config
from pfpl.data.features import Features
from pfpl.errors import AuditError
from pfpl.privacy.modes import mode_of

NONMEMBER_SPLIT = "val"
SHADOW_SPLIT = "test"


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


def _summaries(
    scores: dict[str, np.ndarray], is_member: np.ndarray, delta: float, confidence: float, accountant: float
) -> dict:
    out = {}
    for name, s in scores.items():
        row = summarize(s, is_member, delta, confidence)
        row["exceeds_accountant"] = bool(row["eps_lower_bound"] > accountant)
        out[name] = row
    return out


def audit_targets(
    tower,
    scale: float,
    training: ShadowTraining,
    targets: list[AuditTarget],
    *,
    shadows: int = 8,
    shokri_shadows: int | None = None,
    seed: int = 0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    reference: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> AuditResult:
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
    feats, labels, domains, clients, groups = [], [], [], [], []
    # per target: (offset of its audit records, their number, LiRA in-mask, offset of its pool, pool mask or None)
    plan = []
    offset = 0
    n_dom = 1 + max(
        int(f.domains.max())
        for t in targets
        for f in (t.members, t.nonmembers, t.shadow_pool)
        if f is not None and len(f)
    )
    for t in targets:
        if len(t.members) == 0 or len(t.nonmembers) == 0:
            raise AuditError(f"client {t.client}: no members or no non-members to audit")
        audit = Features(
            torch.cat([t.members.features, t.nonmembers.features]),
            torch.cat([t.members.labels, t.nonmembers.labels]),
            torch.cat([t.members.domains, t.nonmembers.domains]),
        )
        keys = pair_keys(audit.labels.numpy(), audit.domains.numpy(), n_dom)
        in_mask = half_splits(keys, shadows, rng)
        a_off = offset
        feats.append(audit.features), labels.append(audit.labels), domains.append(audit.domains)
        offset += len(audit)
        clients += [a_off + np.flatnonzero(m) for m in in_mask]
        groups += [t.group] * len(in_mask)
        pool = t.shadow_pool if k_s > 0 and t.shadow_pool is not None and len(t.shadow_pool) >= 2 else None
        p_off, pool_mask = offset, None
        if pool is not None:
            pool_mask = half_splits(pair_keys(pool.labels.numpy(), pool.domains.numpy(), n_dom), k_s, rng)
            feats.append(pool.features), labels.append(pool.labels), domains.append(pool.domains)
            offset += len(pool)
            clients += [p_off + np.flatnonzero(m) for m in pool_mask]
            groups += [t.group] * len(pool_mask)
        plan.append((a_off, len(audit), in_mask, p_off, pool_mask))
    data = Features(torch.cat(feats), torch.cat(labels), torch.cat(domains))
    sizes = [len(c) for c in clients]
    if min(sizes) == 0:
        raise AuditError("a shadow got no training records; audit more records per client")
    shadow_seed = int(np.random.SeedSequence([seed, training.engine.seed, 0x5AD0]).generate_state(1)[0] % 2**31)
    sim, dp_plan = shadow_simulator(training, tower, data, clients, scale, reference, shadow_seed, groups)
    t0 = time.time()
    while sim.round < sim.s.rounds:
        sim.run_round()
        if log:
            log(f"{training.method}: shadow round {sim.round}/{sim.s.rounds} ({len(clients)} shadows)")
    with torch.no_grad():
        shadow_text = sim.text_features()
        contexts = torch.stack([t.context for t in targets])  # [B, M, D], or [B, C, M, D] class-specific
        target_text = tower(contexts[:, None] if contexts.dim() == 3 else contexts)
    pooled: dict[str, list[np.ndarray]] = {}
    pooled_member: list[np.ndarray] = []
    per_client = {}
    row = 0
    for i, (t, (a_off, n_a, in_mask, p_off, pool_mask)) in enumerate(zip(targets, plan)):
        x = data.features[a_off : a_off + n_a]
        y = data.labels[a_off : a_off + n_a]
        is_member = np.r_[np.ones(len(t.members), bool), np.zeros(len(t.nonmembers), bool)]
        target_logits = _logits(scale, x, target_text[i])  # [n, C]
        lira_logits = _logits(scale, x, shadow_text[row : row + shadows])  # [K, n, C]
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
            xp, yp = data.features[p_off : p_off + n_p], data.labels[p_off : p_off + n_p]
            probs = torch.softmax(_logits(scale, xp, shadow_text[row : row + k_s]), -1)  # [K_s, n_p, C]
            row += k_s
            attack = ShadowModelAttack().fit(
                probs.reshape(-1, probs.shape[-1]), yp.repeat(k_s), torch.as_tensor(pool_mask.reshape(-1))
            )
            scores["shadow_model"] = attack.scores(torch.softmax(target_logits, -1), y)
        scores = {k: _finite(v) for k, v in scores.items()}
        for k, v in scores.items():
            pooled.setdefault(k, []).append(v)
        pooled_member.append(is_member)
        pred = target_logits.argmax(-1).numpy() == y.numpy()
        per_client[str(t.client)] = {
            "accountant_epsilon": _json_eps(t.accountant_epsilon),
            "n_members": int(is_member.sum()),
            "n_nonmembers": int((~is_member).sum()),
            "members_dropped": int(t.dropped),
            "member_accuracy": float(pred[is_member].mean()),
            "nonmember_accuracy": float(pred[~is_member].mean()),
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
        "shadows": {
            "lira": shadows,
            "shadow_model": k_s if all(p[4] is not None for p in plan) else 0,
            "design": "personal copy of the released global, lr x client weight"
            if isinstance(sim.method, PersonalCopy)
            else "personal part on the fixed released global",
            "rounds": sim.s.rounds,
            "local_steps": sim.local_steps,
            "dp": dp_plan.describe(),
            "seconds": round(time.time() - t0, 1),
        },
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


def load_run(run_dir: Path) -> tuple[Config, dict]:
    """The run's config and summary, or one clear error."""
    from pfpl.config import build_config

    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise AuditError(f"no run folder at {run_dir}")
    if not folder.has_config():
        raise AuditError(f"{run_dir} is not a pfpl run folder (no config.json)")
    if not folder.has_summary():
        if folder.has_checkpoint():
            raise AuditError(
                f"run {run_dir} has not finished (no summary.json); finish it with pfpl run --resume {run_dir}"
            )
        raise AuditError(
            f"run {run_dir} has not finished and has no checkpoint (it never completed a round); "
            "train it again with pfpl run"
        )
    return build_config(folder.read_config()), folder.read_summary()


def audit_run(
    run_dir: Path,
    methods: list[str] | None = None,
    clients: list[int] | None = None,
    *,
    shadows: int = 8,
    shokri_shadows: int | None = None,
    max_members: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    write: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Audit the released prompts of ``methods`` (default: all) for ``clients`` (default: all) of a
    finished run; writes ``audit.json`` and ``audit.png`` into the run folder."""
    from pfpl.data.features import image_features
    from pfpl.federation.client import steps_per_round
    from pfpl.federation.context import Benchmark
    from pfpl.federation.wiring import method_settings, train_settings

    run_dir = Path(run_dir)
    cfg, summary = load_run(run_dir)
    ran = list(summary.get("methods", {}))
    methods = ran if not methods else list(dict.fromkeys(methods))
    check_shadows(shadows)
    if max_members is not None and max_members < 1:
        raise AuditError(f"--members must be at least 1, got {max_members}")
    folder = RunFolder(run_dir)
    prompts: dict[str, ReleasedPrompts] = {}
    for m in methods:
        if m not in ran:
            raise AuditError(f"method {m!r} is not in run {run_dir} (it has: {', '.join(ran)})")
        from pfpl.algorithms import spec

        if not spec(m).one_context:
            raise AuditError(
                f"{m}'s released classifier is more than one context (several prompts combined by its own rule); "
                "the audit queries one context's class features and cannot attack it yet"
            )
        from pfpl.algorithms import prompts_vision

        if prompts_vision(m, cfg.prompt.modality):
            raise AuditError(
                f"{m}'s release holds vision prompts, which change the image features the audit's attacks read; "
                "the audit cannot attack it yet"
            )
        if not folder.prompts_file(m).is_file():
            raise AuditError(f"run {run_dir} has no released prompts for {m!r} ({folder.prompts_file(m).name})")
        prompts[m] = folder.load_prompts(m)
        _parse_clients(clients, prompts[m].context.shape[0])  # fail before any work
    bench = Benchmark(cfg)
    heldout = image_features(bench.backbone, bench.dataset, NONMEMBER_SPLIT, cfg.cache_dir)
    shadow_split = image_features(bench.backbone, bench.dataset, SHADOW_SPLIT, cfg.cache_dir)
    engine = train_settings(cfg)
    engine = replace(engine, local_steps=steps_per_round(bench.partition.sizes(), engine))
    sizes = np.asarray(bench.partition.sizes(), dtype=np.float64)
    report = {
        "run_dir": str(run_dir),
        "delta": cfg.dp.delta,
        "confidence": confidence,
        "seed": seed,
        "dp_mode": cfg.dp.mode,
        "target_epsilon": cfg.dp.target_epsilon if mode_of(cfg.dp).noises else None,
        "protocol": {
            "members": "the target client's training records (train split)"
            + (f", a random {max_members} per client" if max_members else ""),
            "nonmembers": f"{NONMEMBER_SPLIT} split records of the same (class, domain) pairs, "
            "equal numbers pair by pair",
            "lira_shadows": "stratified complementary halves of members + non-members",
            "shadow_model_pool": f"{SHADOW_SPLIT} split records of the same pairs, disjoint from "
            "members and non-members",
        },
        "methods": {},
    }
    for m in methods:
        result = summary["methods"][m]
        released = prompts[m]
        n_clients = released.context.shape[0]
        chosen = _parse_clients(clients, n_clients)
        # the shared prompt each audited client received: one row per group among them
        groups = sorted({int(released.groups[c]) for c in chosen})
        row_of = {g: i for i, g in enumerate(groups)}
        eps_per_client = result.get("epsilon_per_client") or [None] * n_clients
        privacy = result.get("privacy", {})
        sigma = privacy.get("noise_multiplier") if mode_of(privacy.get("mode", "off")).formal else None
        training = ShadowTraining(
            method=m,
            engine=engine,
            method_settings=method_settings(cfg, bench.backbone),
            config=bench.method_config(m),  # with the clip the run measured (dp.clip_quantile)
            noise_multiplier=sigma,
            released={k: v[groups] for k, v in released.shared.items()},
        )
        targets = []
        for c in chosen:
            index = released.clients[c].numpy()
            sets = matched_sets(
                index,
                bench.train,
                heldout,
                shadow_split,
                max_members=max_members,
                seed=int(np.random.SeedSequence([seed, c]).generate_state(1)[0] % 2**31),
            )
            eps = eps_per_client[c]
            targets.append(
                AuditTarget(
                    c,
                    released.context[c],
                    bench.train.subset(sets.members),
                    heldout.subset(sets.nonmembers),
                    shadow_split.subset(sets.shadow_pool),
                    math.inf if eps is None else float(eps),
                    sets.dropped,
                    row_of[int(released.groups[c])],
                )
            )
        # the global-only shadow's learning-rate factor: the audited clients' mean aggregation weight
        training.global_weight = float(np.mean([sizes[c] / sizes.sum() for c in chosen]))
        t0 = time.time()
        out = audit_targets(
            bench.tower,
            bench.backbone.logit_scale,
            training,
            targets,
            shadows=shadows,
            shokri_shadows=shokri_shadows,
            seed=seed,
            delta=cfg.dp.delta,
            confidence=confidence,
            reference=bench.reference,
            log=log,
        )
        out.report.update(
            nominal=bool(privacy.get("nominal", False)),
            privacy_mode=privacy.get("mode", "off"),
            seconds=round(time.time() - t0, 1),
        )
        report["methods"][m] = out.report
    report["attacks"] = strongest(report["methods"])
    report["violations"] = violations(report["methods"])
    if write:
        folder.write_audit(report)
        plot_audit(folder.file("audit.png"), audit_rows([report]))
    return report


# --- several runs (an ε sweep) ---------------------------------------------------------------------


def run_dirs_of(path: Path) -> list[Path]:
    """A run folder itself, or the ``eps-*`` run folders of a sweep folder."""
    path = Path(path)
    if not path.is_dir():
        raise AuditError(f"no run folder at {path}")
    if RunFolder(path).has_config():
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and RunFolder(p).has_config())
    if not runs:
        raise AuditError(f"{path} is neither a pfpl run folder (no config.json) nor a sweep folder of runs")
    return runs


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
    combined = {
        "runs": {str(Path(r["run_dir"])): r for r in reports},
        "table": audit_rows(reports),
        "violations": [dict(v, run_dir=r["run_dir"]) for r in reports for v in r["violations"]],
    }
    if out_dir is None and len(paths) == 1 and Path(paths[0]) not in runs:
        out_dir = Path(paths[0])
    if out_dir is not None:
        RunFolder(out_dir).write_audit(combined)
        plot_audit(Path(out_dir) / "audit.png", combined["table"])
        combined["out_dir"] = str(out_dir)
    return combined
