"""Reading audits: the strongest attack per method, violations of the accountant's ε, flat rows and
the privacy–attack plot."""

from __future__ import annotations

from pathlib import Path

from pfpl.artifacts import atomic_write_bytes, figure_bytes, legend_below

ATTACKS = ("loss", "calibrated_loss", "lira_online", "lira_offline", "shadow_model")


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
        for scope, attacks, eps in [("pooled", r["attacks"], r["accountant_epsilon"])] + [
            (c, pc["attacks"], pc["accountant_epsilon"]) for c, pc in r["per_client"].items()
        ]:
            for name, row in attacks.items():
                if row["exceeds_accountant"]:
                    out.append(
                        {
                            "method": m,
                            "scope": scope,
                            "attack": name,
                            "eps_lower_bound": row["eps_lower_bound"],
                            "accountant_epsilon": eps,
                            "nominal": r.get("nominal", False),
                        }
                    )
    return out


def audit_rows(reports: list[dict]) -> list[dict]:
    """Flat table rows: one per (run, method, attack)."""
    rows = []
    for rep in reports:
        for m, r in rep["methods"].items():
            for name, a in r["attacks"].items():
                rows.append(
                    {
                        "run_dir": rep["run_dir"],
                        "method": m,
                        "attack": name,
                        "target_epsilon": rep.get("target_epsilon"),
                        "accountant_epsilon": r["accountant_epsilon"],
                        "nominal": r.get("nominal", False),
                        **{
                            k: a[k]
                            for k in (
                                "auc",
                                "tpr_at_1pct_fpr",
                                "tpr_at_0.1pct_fpr",
                                "accuracy",
                                "eps_lower_bound",
                                "eps_point_estimate",
                                "n_members",
                                "n_nonmembers",
                            )
                        },
                    }
                )
    return rows


def plot_audit(path: Path, rows: list[dict]) -> None:
    """AUC and TPR at 1% FPR against the accountant's ε, one line per method; each point is the best
    attack on that metric (max over attacks); ∞ (no DP) drawn at the right end; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["accountant_epsilon"] for r in rows if r["accountant_epsilon"] is not None]
    right = max(finite) * 4 if finite else 1.0
    x_of = lambda e: right if e is None else max(float(f"{float(e):.3g}"), 1e-3)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, m in enumerate(methods):
        for ax, key in zip(axes, ("auc", "tpr_at_1pct_fpr")):
            best: dict[str, dict] = {}
            for r in rows:
                if r["method"] == m and (r["run_dir"] not in best or r[key] > best[r["run_dir"]][key]):
                    best[r["run_dir"]] = r
            pts = sorted(best.values(), key=lambda r: x_of(r["accountant_epsilon"]))
            ax.plot(
                [x_of(r["accountant_epsilon"]) for r in pts], [r[key] for r in pts], marker="o", color=f"C{i}", label=m
            )
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
    legend_below(fig, axes)
    atomic_write_bytes(path, figure_bytes(fig))
    plt.close(fig)
