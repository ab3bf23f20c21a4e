"""A run's privacy plan: from the ``dp`` config, the method's declarations and the shape of the
training, the client-side gradient mechanism, the server-side aggregator wrappers, the calibrated
σ, and each client's ε(δ) for its released prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pfpl.algorithms import METHOD_NAMES
from pfpl.config import DPConfig
from pfpl.errors import PrivacyConfigError
from pfpl.messages import Aggregator
from pfpl.privacy.accounting import Mechanism, calibrate_noise, epsilon
from pfpl.privacy.aggregation import ClientLevelDP, GlobalDP, ReferenceServerNoise
from pfpl.privacy.mechanisms import BatchClipReference, BatchMean, FeatureDP, GradientMechanism, PerSampleDP

DP_MODES = ("off", "feature", "per-sample", "reference")
# the published code has no DP CoOp baseline, so ``reference`` has no counterpart to reproduce for it
REFERENCE_METHODS = tuple(m for m in METHOD_NAMES if m != "coop")


@dataclass(frozen=True)
class MethodLeaves:
    """What the privacy plan needs to know of a method (without importing it)."""

    name: str
    private_leaves: tuple[str, ...]  # leaves local DP noises on the client
    shared_leaves: tuple[str, ...]  # leaves of shared parameters


@dataclass(frozen=True)
class TrainingShape:
    """How records meet the mechanism: per-client sizes, batches, steps, rounds, sync, sampling."""

    sizes: tuple[int, ...]
    batch_size: int
    steps_per_round: int
    rounds: int
    sync: str
    participation: float
    sampling: str

    def expected_batch(self) -> list[int]:
        return [min(self.batch_size, n) for n in self.sizes]


def reference_sigma(nominal_epsilon: float, delta: float, rounds: int) -> float:
    """The published code's σ = q·√(T·ln(1/δ))/ε with q = 1 and T = rounds."""
    if math.isinf(nominal_epsilon):
        return 0.0
    return math.sqrt(rounds * math.log(1 / delta)) / nominal_epsilon


def sample_mechanisms(
    mode: str, sigma: float, sigma_global: float, q: float, steps: int, has_local: bool, has_shared_global: bool
) -> list[Mechanism]:
    """The Gaussian mechanisms that touch one client's records, as the released prompt composes them."""
    if mode == "feature":
        return [Mechanism(sigma, q, steps, "feature")]
    mechs = []
    if has_local:
        mechs.append(Mechanism(sigma, q, steps, "local"))
    if has_shared_global:
        mechs.append(Mechanism(sigma_global, q, steps, "global"))
    return mechs


def released_epsilon(mechs: list[Mechanism], delta: float, accountant: str) -> float:
    if not mechs or any(m.noise_multiplier == 0 for m in mechs):
        return math.inf
    return epsilon(mechs, delta, accountant)


def calibrate(target_epsilon: float, delta: float, q: float, steps: int, n_mechanisms: int, accountant: str) -> float:
    """σ (shared by the ``n_mechanisms`` composed mechanisms) so the released prompt meets the target."""
    if math.isinf(target_epsilon):
        return 0.0
    return calibrate_noise(target_epsilon, delta, q, steps, accountant=accountant, n_mechanisms=n_mechanisms)


def validate_dp(dp: DPConfig, methods: list[str]) -> None:
    """One clear error for every bad combination, before any training starts."""
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
    if dp.client_noise_multiplier > 0 and dp.client_clip == 0:
        raise PrivacyConfigError("dp.client_noise_multiplier > 0 needs dp.client_clip > 0")


@dataclass
class PrivacyPlan:
    """How a method's released prompts are protected, and their ε(δ) per client."""

    mode: str
    delta: float
    accountant: str
    sampling: str
    clip: float
    batch_size: int
    sigma: float
    sigma_global: float
    has_local: bool
    has_shared_global: bool
    private_leaves: tuple[str, ...]
    rates: list[float]  # per client: Poisson rate, or 1.0 (shuffle: no amplification claimed)
    steps_per_round: list[int]  # per client: steps (Poisson) or participations of a record (shuffle)
    nominal_epsilon: float | None = None
    client_clip: float = 0.0
    client_sigma: float = 0.0
    participation: float = 1.0
    unprotected_global: bool = False  # a shared leaf is released without any noise
    client_steps_per_round: int = 1  # client-level mechanism applications per round (every step in step sync)

    # ---- the mechanisms ------------------------------------------------------------------------
    def gradient_mechanism(self) -> GradientMechanism:
        """The client update's sample-level mechanism."""
        if self.mode == "feature":
            return FeatureDP(self.clip, self.sigma)
        if self.mode == "per-sample":
            return PerSampleDP(self.clip, self.sigma, self.private_leaves)
        if self.mode == "reference":
            return BatchClipReference(self.clip, self.sigma, self.private_leaves)
        return BatchMean()

    def wrap_aggregator(self, inner: Aggregator) -> Aggregator:
        """The server's aggregator with client-level DP and global DP around it."""
        if self.client_clip > 0:
            inner = ClientLevelDP(inner, self.client_clip, self.client_sigma)
        if self.has_shared_global and self.sigma_global > 0:
            inner = GlobalDP(inner, self.sigma_global, self.clip, self.batch_size)
        elif self.mode == "reference" and self.sigma > 0:
            inner = ReferenceServerNoise(inner, self.sigma, self.clip, self.batch_size)
        return inner

    # ---- accounting ----------------------------------------------------------------------------
    def client_mechanisms(self, client: int, rounds: int) -> list[Mechanism]:
        steps = self.steps_per_round[client] * rounds
        return sample_mechanisms(
            self.mode,
            self.sigma,
            self.sigma_global,
            self.rates[client],
            max(steps, 1),
            self.has_local,
            self.has_shared_global,
        )

    def epsilons(self, participations: torch.Tensor) -> list[float]:
        """Each client's ε(δ) for its released prompt after the rounds it took part in."""
        if self.mode == "reference":
            return [float(self.nominal_epsilon)] * len(self.rates)
        if self.unprotected_global or self.mode == "off":
            return [math.inf] * len(self.rates)
        out = []
        for c, rounds in enumerate(participations.tolist()):
            out.append(
                0.0 if rounds == 0 else released_epsilon(self.client_mechanisms(c, rounds), self.delta, self.accountant)
            )
        return out

    def client_level_epsilon(self, rounds: int) -> float | None:
        if self.client_sigma == 0:
            return None
        steps = rounds * self.client_steps_per_round
        return epsilon(Mechanism(self.client_sigma, self.participation, steps, "client"), self.delta, self.accountant)

    def describe(self) -> dict:
        if self.mode == "reference":
            guarantee = "nominal only: the published code's batch clipping; no formal guarantee"
        elif self.unprotected_global or self.mode == "off":
            guarantee = "none: a shared part of the released prompt carries no noise"
        elif self.mode == "feature":
            guarantee = (
                "sample-level DP of the whole released prompt (post-processing of the noisy text-feature gradients)"
            )
        else:
            parts = (["local DP on the private leaves"] if self.has_local else []) + (
                ["global DP on the aggregated global gradient"] if self.has_shared_global else []
            )
            guarantee = "sample-level DP, composition of " + " and ".join(parts)
        return {
            "mode": self.mode,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "adjacency": "add/remove one record of the client's training data",
            "noise_multiplier": self.sigma,
            "global_noise_multiplier": self.sigma_global,
            "client_noise_multiplier": self.client_sigma,
            "guarantee": guarantee,
            "nominal": self.mode == "reference",
        }


def plan_privacy(dp: DPConfig, method: MethodLeaves, shape: TrainingShape) -> PrivacyPlan:
    """Calibrate σ for the worst-off client and return the plan (mode 'off' plans no noise)."""
    expected = shape.expected_batch()
    n = len(shape.sizes)
    if dp.sampling == "poisson":
        rates = [e / s for e, s in zip(expected, shape.sizes)]
        steps = [shape.steps_per_round] * n
    else:
        rates = [1.0] * n
        steps = [math.ceil(shape.steps_per_round * e / s) for e, s in zip(expected, shape.sizes)]
    has_local = bool(method.private_leaves)
    shared = tuple(x for x in method.shared_leaves if x not in method.private_leaves)
    has_shared_global = bool(shared) and dp.global_dp and dp.mode == "per-sample"
    n_mech = 1 if dp.mode == "feature" else int(has_local) + int(has_shared_global)
    sigma = dp.noise_multiplier
    nominal = None
    if dp.mode == "reference":
        nominal = dp.target_epsilon
        sigma = reference_sigma(dp.target_epsilon, dp.delta, shape.rounds)
    elif dp.mode != "off" and dp.target_epsilon is not None:
        worst = max(range(n), key=lambda c: (rates[c], steps[c]))
        sigma = calibrate(
            dp.target_epsilon, dp.delta, rates[worst], steps[worst] * shape.rounds, max(n_mech, 1), dp.accountant
        )
    return PrivacyPlan(
        mode=dp.mode,
        delta=dp.delta,
        accountant=dp.accountant,
        sampling=dp.sampling,
        clip=dp.clip,
        batch_size=shape.batch_size,
        sigma=sigma,
        sigma_global=sigma if has_shared_global else 0.0,
        has_local=has_local and dp.mode != "feature",
        has_shared_global=has_shared_global,
        private_leaves=method.private_leaves,
        rates=rates,
        steps_per_round=steps,
        nominal_epsilon=nominal,
        client_clip=dp.client_clip,
        client_sigma=dp.client_noise_multiplier,
        participation=shape.participation,
        unprotected_global=dp.mode == "per-sample" and bool(shared) and not dp.global_dp,
        client_steps_per_round=shape.steps_per_round if shape.sync == "step" else 1,
    )
