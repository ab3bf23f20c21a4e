"""From a finished run folder to one client's prompt artifact, with its privacy certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfpl.artifacts import RunFolder
from pfpl.errors import ArtifactError
from pfpl.prompts.artifact import PromptArtifact

_CERTIFICATE_FIELDS = (
    "delta",
    "adjacency",
    "unit",
    "clip",
    "noise_multiplier",
    "global_noise_multiplier",
    "sampling",
    "accountant",
    "epsilon_kind",
    "randomness",  # "secret": the noise came from the client's own secret; "seeded": from the config seed
    "holds_against",  # each party DESIGN §5 names -> None where ε holds against it, else why not
    "public",  # what the guarantee treats as public (not protected)
    "secure_aggregation",
    "client_level",
)


def certificate(summary: dict, method: str, client: int, audit: dict | None) -> dict[str, Any]:
    """What the run's accountant (and audit, if any) says about this client's released prompt. The
    plan decides whether the guarantee is formal (``privacy.formal_guarantee``: an accounted mode,
    something noised, noise from the parties' secrets); data-dependent figures no mechanism covers
    stay out, except the audit's federation-wide attack summary, labelled as not covered."""
    entry = summary["methods"][method]
    privacy = entry.get("privacy") or {}
    per_client = entry.get("epsilon_per_client") or []
    epsilon = per_client[client] if client < len(per_client) else None
    formal = epsilon is not None and bool(privacy.get("formal_guarantee", False))
    guarantee = privacy.get("guarantee", "none")
    setup = summary.get("setup", {})
    out: dict[str, Any] = {
        "method": method,
        "dp_mode": privacy.get("mode", "off"),
        "epsilon": epsilon,  # None: no finite bound (∞)
        **{k: privacy.get(k) for k in _CERTIFICATE_FIELDS},
        "rounds": setup.get("rounds"),
        "local_steps_per_round": setup.get("local_steps"),
        "client_level_epsilon": entry.get("client_level_epsilon"),
        "formal_guarantee": formal,
        "guarantee": guarantee if formal else f"no formal guarantee ({guarantee})",
        "audit": None,
    }
    if audit and method in audit.get("methods", {}):
        report = audit["methods"][method]
        rows = list(report.get("attacks", {}).values())
        out["audit"] = {
            "auc_max": max((r["auc"] for r in rows), default=None),
            "eps_lower_bound_max": max((r["eps_lower_bound"] for r in rows), default=None),
            "attacks": sorted(report.get("attacks", {})),
            # an empirical check on the audited clients' records, outside every accountant
            "covered_by_epsilon": False,
        }
    return out


def export_prompt(run_dir: Path | str, method: str, client: int) -> PromptArtifact:
    """Client ``client``'s released prompt of ``method`` in the run at ``run_dir``."""
    from pfpl.algorithms import prompted_towers, prompts_vision, spec
    from pfpl.config import build_config
    from pfpl.data import build_dataset

    folder = RunFolder(run_dir)
    if not folder.has_config():
        raise ArtifactError(f"{run_dir} is not a pfpl run folder (no config.json)")
    if not folder.has_summary():
        raise ArtifactError(f"run {run_dir} has not finished (no summary.json); finish it with pfpl run --resume")
    summary = folder.read_summary()
    trained = sorted(summary["methods"])
    if method not in trained:
        raise ArtifactError(f"run {run_dir} has no method {method!r}; it trained: {', '.join(trained)}")
    if spec(method).auxiliary:
        raise ArtifactError(
            f"{method}'s prompt is trained for its auxiliary model, not the backbone; exporting it is not supported"
        )
    if not spec(method).one_context:
        raise ArtifactError(
            f"{method}'s released classifier is more than one context (several prompts combined by its own rule), "
            "which a prompt artifact cannot hold; exporting it is not supported"
        )
    if not folder.prompts_file(method).is_file():
        raise ArtifactError(
            f"run {run_dir} kept no released prompts for {method} (a Flower run keeps them on its SuperNodes)"
        )
    prompts = folder.load_prompts(method)
    n = int(prompts.context.shape[0])
    if not 0 <= client < n:
        raise ArtifactError(f"--client {client} is out of range: the run has clients 0 … {n - 1}")
    state = folder.load_checkpoint()
    cfg = build_config(state["config"])
    vision = None
    if prompts_vision(method, cfg.prompt.modality):
        if prompts.vision is None:
            raise ArtifactError(
                f"run {run_dir}'s prompts file for {method} keeps no released vision prompts (made by an older "
                "pfpl); rerun it to export them"
            )
        vision = prompts.vision[client]
    frozen_text = prompted_towers(method, cfg.prompt.modality) == "vision"  # the template classifies
    fingerprint = state.get("fingerprints", {}).get("backbone")
    if not fingerprint:
        raise ArtifactError(f"run {run_dir}'s checkpoint records no backbone fingerprint (made by an older pfpl)")
    audit_file = folder.file("audit.json")
    audit = None
    if audit_file.is_file():
        import json

        audit = json.loads(audit_file.read_text())
    per_client = summary["methods"][method].get("per_client", {})
    provenance = {
        "run": str(Path(run_dir).resolve()),
        "dataset": cfg.data.dataset,
        # measured on the client's test records, which no ε covers (they are not its training records)
        **{f"{k}_accuracy": v[client] for k, v in per_client.items() if client < len(v)},
        "accuracy_covered_by_epsilon": False,
    }
    return PromptArtifact(
        context=None if frozen_text else prompts.context[client],
        vision=vision,
        vision_start=cfg.prompt.vision_start,
        classnames=list(build_dataset(cfg.data).classnames),
        template=cfg.prompt.template,
        backbone=cfg.backbone.name,
        backbone_pretrained=cfg.backbone.pretrained,
        backbone_fingerprint=fingerprint,
        method=method,
        client=client,
        certificate=certificate(summary, method, client, audit),
        provenance=provenance,
    )
