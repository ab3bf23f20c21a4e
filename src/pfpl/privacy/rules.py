"""Which privacy configurations pfpl runs: every combination it cannot run or cannot account for is
refused here with one line, before any training. Importable without torch, so the CLI checks a
config in a fraction of a second."""

from __future__ import annotations

from pfpl.algorithms import CLUSTERING_METHODS
from pfpl.config import DPConfig, FederationConfig
from pfpl.errors import PrivacyConfigError

DP_MODES = ("off", "feature", "per-sample", "reference")
#: the methods of the published DP-FPL code, which ``reference`` mode reproduces (it has no DP CoOp)
REFERENCE_METHODS = ("promptfl", "fedotp", "fedpgp", "dplora", "dpfpl")


def validate_dp(
    dp: DPConfig,
    methods: list[str],
    federation: FederationConfig | None = None,
    cluster_on: str = "images",
) -> None:
    """One clear error for every combination pfpl cannot run or cannot account for, before any training.
    ``cluster_on``: what SecFPP's clustering reads (``secfpp.cluster_on``)."""
    private = dp.mode != "off" or dp.client_noise_multiplier > 0
    clustering = [m for m in methods if m in CLUSTERING_METHODS]
    if private and clustering and cluster_on == "images":
        raise PrivacyConfigError(
            f"{clustering[0]} clusters clients on their raw mean image features, which no DP mechanism covers, "
            "so no ε would hold for its prompts; set secfpp.cluster_on='prompts' (it then clusters DP outputs) "
            "or run secfpp-global (no clustering)"
        )
    if dp.mode == "off" and (dp.target_epsilon is not None or dp.noise_multiplier > 0):
        raise PrivacyConfigError(
            "dp.target_epsilon / dp.noise_multiplier are set but dp.mode='off'; "
            "set dp.mode to feature, per-sample or reference"
        )
    if dp.mode == "reference":
        unsupported = [m for m in methods if m not in REFERENCE_METHODS]
        if unsupported:
            raise PrivacyConfigError(
                f"dp.mode='reference' does not support method {unsupported[0]!r} (the published "
                f"code has no such baseline); supported: {', '.join(REFERENCE_METHODS)}"
            )
        if dp.target_epsilon is None:
            raise PrivacyConfigError("dp.mode='reference' needs dp.target_epsilon (its nominal ε)")
    if dp.target_epsilon is not None and dp.noise_multiplier > 0:
        raise PrivacyConfigError(
            f"set either dp.target_epsilon ({dp.target_epsilon}) or dp.noise_multiplier "
            f"({dp.noise_multiplier}), not both"
        )
    if dp.mode in ("feature", "per-sample") and dp.target_epsilon is None and dp.noise_multiplier == 0:
        raise PrivacyConfigError(
            f"dp.mode={dp.mode!r} with neither dp.target_epsilon nor dp.noise_multiplier adds no noise (ε = ∞); "
            "set dp.target_epsilon (or dp.noise_multiplier > 0), or dp.mode='off' for a non-private run"
        )
    if dp.client_noise_multiplier > 0 and dp.client_clip == 0:
        raise PrivacyConfigError("dp.client_noise_multiplier > 0 needs dp.client_clip > 0")
    if federation is None:
        return
    if federation.secure_aggregation and dp.mode == "reference":
        raise PrivacyConfigError(
            "dp.mode='reference' reproduces a server that reads every update and adds the noise itself; "
            "it cannot run with federation.secure_aggregation"
        )
    distributed = federation.secure_aggregation and (
        (dp.mode == "per-sample" and dp.global_dp) or dp.client_noise_multiplier > 0
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
    if dp.mode == "per-sample" and dp.global_dp and federation.sync == "fedavg":
        raise PrivacyConfigError(
            "dp.mode='per-sample' with dp.global_dp and federation.sync='fedavg' cannot be accounted: the "
            "server's noise would cover a multi-step local update whose sensitivity to one record grows with "
            "the learning rate, momentum and steps; use federation.sync='step', or dp.mode='feature' "
            "(every step noised on the client)"
        )
