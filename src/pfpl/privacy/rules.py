"""Which privacy configurations pfpl runs: every combination it cannot run or cannot account for is
refused here with one line, before any training. Importable without torch, so the CLI checks a
config in a fraction of a second."""

from __future__ import annotations

from pfpl.algorithms import spec
from pfpl.config import DPConfig, FederationConfig
from pfpl.errors import PrivacyConfigError
from pfpl.privacy.modes import DP_MODES, REFERENCE_METHODS, is_private, mode_of

__all__ = ["DP_MODES", "REFERENCE_METHODS", "validate_dp"]


def validate_dp(
    dp: DPConfig,
    methods: list[str],
    federation: FederationConfig | None = None,
    cluster_on: str = "images",
) -> None:
    """One clear error for every combination pfpl cannot run or cannot account for, before any training.
    ``cluster_on``: what SecFPP's clustering reads (``secfpp.cluster_on``)."""
    kind = mode_of(dp)
    clustering = [m for m in methods if spec(m).clusters]
    if is_private(dp) and clustering and cluster_on == "images":
        raise PrivacyConfigError(
            f"{clustering[0]} clusters clients on their raw mean image features, which no DP mechanism covers, "
            "so no ε would hold for its prompts; set secfpp.cluster_on='prompts' (it then clusters DP outputs) "
            "or run secfpp-global (no clustering)"
        )
    if dp.client_noise_multiplier > 0 and clustering:
        raise PrivacyConfigError(
            f"client-level DP cannot be accounted for {clustering[0]}: its clustering reads each client's class-level "
            "prompt, which no client-level mechanism noises (only the shared domain prompt is); run secfpp-global, "
            "or sample-level DP (dp.mode = 'feature' / 'per-sample') without dp.client_noise_multiplier"
        )
    downloads = [m for m in methods if spec(m).downloads]
    if dp.client_noise_multiplier > 0 and downloads:
        raise PrivacyConfigError(
            f"client-level DP cannot be accounted for {downloads[0]}: it aggregates nothing for the server to noise, "
            "while every client's prompt travels to the others individually (its experts); use sample-level DP "
            "(dp.mode = 'feature' / 'per-sample'), which covers each prompt before it leaves its client"
        )
    if not kind.noises and (dp.target_epsilon is not None or dp.noise_multiplier > 0):
        raise PrivacyConfigError(
            "dp.target_epsilon / dp.noise_multiplier are set but dp.mode='off'; "
            "set dp.mode to feature, per-sample or reference"
        )
    if kind.methods is not None:
        unsupported = [m for m in methods if m not in kind.methods]
        if unsupported:
            raise PrivacyConfigError(
                f"dp.mode={dp.mode!r} does not support method {unsupported[0]!r} (the published "
                f"code has no such baseline); supported: {', '.join(kind.methods)}"
            )
    if kind.nominal and dp.target_epsilon is None:
        raise PrivacyConfigError(f"dp.mode={dp.mode!r} needs dp.target_epsilon (its nominal ε)")
    if dp.target_epsilon is not None and dp.noise_multiplier > 0:
        raise PrivacyConfigError(
            f"set either dp.target_epsilon ({dp.target_epsilon}) or dp.noise_multiplier "
            f"({dp.noise_multiplier}), not both"
        )
    if kind.formal and dp.target_epsilon is None and dp.noise_multiplier == 0:
        raise PrivacyConfigError(
            f"dp.mode={dp.mode!r} with neither dp.target_epsilon nor dp.noise_multiplier adds no noise (ε = ∞); "
            "set dp.target_epsilon (or dp.noise_multiplier > 0), or dp.mode='off' for a non-private run"
        )
    if dp.client_noise_multiplier > 0 and dp.client_clip == 0:
        raise PrivacyConfigError("dp.client_noise_multiplier > 0 needs dp.client_clip > 0")
    if federation is None:
        return
    if federation.secure_aggregation and not kind.secure_aggregation:
        raise PrivacyConfigError(
            f"dp.mode={dp.mode!r} reproduces a server that reads every update and adds the noise itself; "
            "it cannot run with federation.secure_aggregation"
        )
    distributed = federation.secure_aggregation and (
        (kind.splits_leaves and dp.global_dp) or dp.client_noise_multiplier > 0
    )
    if distributed and dp.accountant != "rdp":
        raise PrivacyConfigError(
            "distributed DP under secure aggregation (Skellam noise) is accounted by Rényi DP at integer orders; "
            f"set dp.accountant='rdp' (not {dp.accountant!r})"
        )
    if dp.client_noise_multiplier > 0 and federation.participation < 1 and federation.client_sampling != "poisson":
        raise PrivacyConfigError(
            f"client-level DP with federation.participation={federation.participation} needs "
            "federation.client_sampling='poisson': its accountant amplifies by Poisson sampling of clients, "
            "which a fixed-size sample of clients is not"
        )
    if kind.splits_leaves and dp.global_dp and federation.sync == "fedavg":
        raise PrivacyConfigError(
            "dp.mode='per-sample' with dp.global_dp and federation.sync='fedavg' cannot be accounted: the "
            "server's noise would cover a multi-step local update whose sensitivity to one record grows with "
            "the learning rate, momentum and steps; use federation.sync='step', or dp.mode='feature' "
            "(every step noised on the client)"
        )
