"""A run's privacy plan: from the ``dp`` config, the method's declarations and the shape of the
training, the client-side gradient mechanism, the server-side aggregator wrappers, the calibrated
σ, and the events each round charges to each client's accountant — every ε pfpl prints comes from
those events (docs/privacy.md has the table of accepted combinations).

Sample-level events, per client and round (one record's view):

- ``poisson`` sampling: every step is one Poisson-subsampled Gaussian at rate q = b'/n with
  σ_eff, where σ_eff = σ for one mechanism and (σ⁻² + σ_G⁻²)^(−1/2) when local DP on the private
  leaves and global DP on the shared gradient act on the *same* batch (per-sample mode): the
  record's clipped contributions to both, measured in units of their noise, form one Gaussian
  mechanism. Adjacency: add/remove one record.
- ``shuffle`` sampling (fixed-size batches, no amplification claimed): adjacency is replace-one
  record — the replaced record moves a batch's clipped sum by up to 2C — so each batch the record
  can appear in is a Gaussian at σ_eff / 2, and a record appears in at most
  :func:`~pfpl.data.clients.appearances_per_round` batches of a round.

Client-level events (``dp.client_clip`` > 0), once per round for the whole federation: clients
take part independently with probability p (``federation.client_sampling = "poisson"``, or p = 1),
each aggregation divides the clipped sum by the expected number of participants and adds
N(0, σ_c²S²/D²), and the A aggregations of a round (A = local steps in ``step`` sync, 1 in
``fedavg``) compose to one Gaussian at σ_c/√A: PoissonSampled(p, Gaussian(σ_c/√A)). Adjacency:
add/remove one client with all its data. Under secure aggregation (distributed DP) the server picks
the participants and sees who took part, so no amplification by client sampling is claimed there.

**Who learns what** (DESIGN §5): :meth:`PrivacyPlan.parties` says, for each party — the receiver of a
released prompt, another client, the server, the server with colluding clients — whether the
accounted ε holds against it, and why not where it does not. A run whose mechanism draws come from
the config seed (``dp.randomness = 'seeded'``) has no formal guarantee against anyone: whoever holds
the config regenerates its noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pfpl.config import DPConfig
from pfpl.data.clients import appearances_per_round, expected_batch
from pfpl.errors import PrivacyConfigError
from pfpl.messages import Aggregator
from pfpl.privacy import aggregation, skellam
from pfpl.privacy.accounting import Accountant, calibrate_noise
from pfpl.privacy.aggregation import ClientLevelDP, GlobalDP
from pfpl.privacy.mechanisms import GradientMechanism
from pfpl.privacy.modes import SampleMode, mode_of

#: one accountant event: (noise multiplier, sample rate, count)
Event = tuple[float, float, int]


@dataclass(frozen=True)
class MethodLeaves:
    """What the privacy plan needs to know of a method (without importing it)."""

    name: str
    private_leaves: tuple[str, ...]  # leaves local DP noises on the client
    shared_leaves: tuple[str, ...]  # leaves of shared parameters
    public: tuple[str, ...] = ()  # what the method's release reveals by its structure (Method.public_facts)

    @property
    def clipped_only(self) -> tuple[str, ...]:
        """Shared leaves the client clips but does not noise: global DP must protect them."""
        return tuple(x for x in self.shared_leaves if x not in self.private_leaves)


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
    client_sampling: str = "fixed"
    randomness: str = "seeded"  # "secret": mechanism draws from the parties' secrets
    shared_numel: int = 0  # entries of the shared vector one aggregation sums (distributed DP's dimension)
    secure_noise_bits: int | None = None  # secure aggregation on: its distributed noise has integer std 2^this
    colluders: str = "t - 1"  # the clients distributed DP's noise is sized to survive (secure.colluders)

    def expected_batch(self) -> list[int]:
        return [expected_batch(n, self.batch_size) for n in self.sizes]


def reference_sigma(nominal_epsilon: float, delta: float, rounds: int) -> float:
    """The published code's σ = q·√(T·ln(1/δ))/ε with q = 1 and T = rounds."""
    if math.isinf(nominal_epsilon):
        return 0.0
    return math.sqrt(rounds * math.log(1 / delta)) / nominal_epsilon


@dataclass
class PrivacyPlan:
    """How a method's released prompts are protected, and what each round charges."""

    mode: str
    delta: float
    accountant: str
    sampling: str
    clip: float
    batch_size: int
    sigma: float  # the client's noise multiplier (feature mode, or local DP on the private leaves)
    sigma_global: float  # the server's noise multiplier on the clipped shared gradient (per-sample mode)
    private_leaves: tuple[str, ...]
    has_local: bool  # per-sample mode: the client noises private leaves
    has_shared_global: bool  # per-sample mode: the server's global DP protects shared leaves
    unprotected: bool = False  # a shared leaf is released with no noise (per-sample, global_dp off)
    nominal_epsilon: float | None = None
    client_clip: float = 0.0
    client_sigma: float = 0.0
    participation: float = 1.0
    aggregations_per_round: int = 1  # client-level mechanism applications per round
    secure_noise_bits: int | None = None  # secure aggregation (SecAgg+) with distributed DP, when set
    max_record_weight: float = 0.0  # max_i w_i / B_i over the federation (w_i = n_i, or 1 with client-level DP)
    shared_numel: int = 0
    randomness: str = "seeded"  # where the mechanism draws come from: "secret" (the parties') or "seeded"
    secure_aggregation: bool = False
    colluders: str = "t - 1"  # who distributed DP's noise survives, in words (secure.colluders)
    public: tuple[str, ...] = ()  # beyond PUBLIC: what the method's release treats as public

    @property
    def kind(self) -> SampleMode:
        """The sample-level mode object (:mod:`pfpl.privacy.modes`)."""
        return mode_of(self.mode)

    # ---- the mechanisms ------------------------------------------------------------------------
    def gradient_mechanism(self) -> GradientMechanism:
        """The client update's sample-level mechanism."""
        return self.kind.gradient_mechanism(self)

    def wrap_aggregator(self, inner: Aggregator) -> Aggregator:
        """The server's plaintext aggregator: client-level DP and global DP around ``inner`` (both, when
        both are on). With secure aggregation the clients do this themselves: see :meth:`secure_policy`."""
        if self.client_clip > 0:
            inner = ClientLevelDP(inner, self.client_clip, self.client_sigma)
        if self.has_shared_global and self.sigma_global > 0:
            inner = GlobalDP(inner, self.sigma_global, self.clip, self.batch_size)
        elif self.kind.server_noise and self.sigma > 0:
            inner = getattr(aggregation, self.kind.server_noise)(inner, self.sigma, self.clip, self.batch_size)
        return inner

    # ---- distributed DP (secure aggregation) ----------------------------------------------------
    def secure_policy(self) -> dict:
        """What each client does to its vector under secure aggregation: its weighting (sizes, or equal
        with client-level DP), its own clipping, and the distributed noise std the shares must add."""
        return {
            "weighting": "equal" if self.client_clip > 0 else "size",
            "client_clip": self.client_clip,
            "noise_std": self.distributed_std(),
        }

    def distributed_std(self) -> float:
        """The Gaussian-equivalent noise std the clients' Skellam shares add to a group's sum: global
        DP's σ_G·C·max w_i/B_i and client-level DP's σ_c·S, in units of the sum."""
        global_std = self.sigma_global * self.clip * self.max_record_weight if self.has_shared_global else 0.0
        client_std = self.client_sigma * self.client_clip
        return math.hypot(global_std, client_std)

    def _skellam_curve(self, l2_real: float) -> np.ndarray:
        """RDP at the integer orders of one secure aggregation whose sum moves by ``l2_real`` (real units)."""
        std = self.distributed_std()
        scale = 2.0**self.secure_noise_bits / std
        lam = (2.0**self.secure_noise_bits) ** 2 / 2
        l2, l1 = skellam.integer_sensitivity(l2_real, scale, max(1, self.shared_numel))
        return skellam.skellam_rdp(skellam.INTEGER_ORDERS, l2, l1, lam)

    @property
    def distributed(self) -> bool:
        return self.secure_noise_bits is not None and self.distributed_std() > 0

    def _sample_curve(self, size: int) -> tuple[np.ndarray, int]:
        """Per-round RDP curve of one client's records with distributed global DP, and its count."""
        factor = 2.0 if self.sampling == "shuffle" else 1.0  # replace-one: twice the sensitivity
        curve = self._skellam_curve(factor * self.clip * self.max_record_weight)
        if self.has_local:
            curve = curve + skellam.gaussian_rdp(skellam.INTEGER_ORDERS, self.sigma / factor)
        return curve, factor

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def sample_level(self) -> bool:
        """Whether sample-level ε is accounted (a formal mode, not nominal, nothing released un-noised)."""
        return self.kind.formal and not self.unprotected

    @property
    def effective_sigma(self) -> float:
        """σ_eff of one step for one record (0 = no privacy)."""
        if not self.kind.splits_leaves or (self.has_local and not self.has_shared_global):
            return self.sigma
        if self.has_shared_global and not self.has_local:
            return self.sigma_global
        if self.sigma == 0 or self.sigma_global == 0:
            return 0.0
        return (self.sigma**-2 + self.sigma_global**-2) ** -0.5

    def round_events(self, size: int, steps: int) -> list[Event]:
        """The Gaussian events one round of ``steps`` local steps charges a client with ``size`` records
        (with distributed DP the events are RDP curves: see :meth:`charge_round`)."""
        if not self.sample_level or steps == 0:
            return []
        if self.sampling == "poisson":
            return [(self.effective_sigma, expected_batch(size, self.batch_size) / size, steps)]
        return [(self.effective_sigma / 2, 1.0, appearances_per_round(size, steps, self.batch_size))]

    def charge_round(self, ledger: Accountant, size: int, steps: int) -> None:
        """Record in a client's accountant what one round cost its records."""
        if not (self.distributed and self.has_shared_global):
            for sigma, q, n in self.round_events(size, steps):
                ledger.step(sigma, q, n)
            return
        if not self.sample_level or steps == 0:
            return
        curve, _ = self._sample_curve(size)
        if self.sampling == "poisson":
            q = expected_batch(size, self.batch_size) / size
            ledger.step_rdp(skellam.poisson_subsampled_rdp(skellam.INTEGER_ORDERS, q, curve), steps)
        else:
            ledger.step_rdp(curve, appearances_per_round(size, steps, self.batch_size))

    def charge_client_level(self, ledger: Accountant) -> None:
        """Record in the federation's client-level accountant what one round cost."""
        if self.client_sigma == 0:
            return
        if not self.distributed:
            for sigma, q, n in self.client_level_events():
                ledger.step(sigma, q, n)
            return
        # the server picks (and sees) the participants: no amplification by client sampling against it
        ledger.step_rdp(self.aggregations_per_round * self._skellam_curve(self.client_clip))

    def client_epsilon(self, ledger: Accountant, rounds_taken: int) -> float:
        """A client's ε(δ) for its released prompt (nominal ε in reference mode; ∞ when unprotected)."""
        if self.kind.nominal:
            return float(self.nominal_epsilon)
        if not self.sample_level:
            return math.inf
        return 0.0 if rounds_taken == 0 else ledger.epsilon(self.delta)

    def client_level_events(self) -> list[Event]:
        """What one round charges the federation's client-level accountant."""
        if self.client_sigma == 0:
            return []
        return [(self.client_sigma / math.sqrt(self.aggregations_per_round), self.participation, 1)]

    @property
    def epsilon_kind(self) -> str:
        """How to read the ε this plan reports: 'accounted', 'nominal' or 'none'."""
        if self.kind.nominal:
            return "nominal"
        return "accounted" if self.sample_level and self.effective_sigma > 0 else "none"

    @property
    def seeded(self) -> bool:
        """A private run whose noise anyone holding the config can regenerate (an experiment)."""
        return self.randomness == "seeded" and (self.kind.noises or self.client_sigma > 0)

    def formal(self) -> bool:
        """Whether the sample-level ε is a formal bound (accounted, secret noise, something noised)."""
        return self.epsilon_kind == "accounted" and not self.seeded

    def client_level_formal(self) -> bool:
        return self.client_sigma > 0 and not self.seeded

    def guarantee(self) -> str:
        """The sample-level guarantee, in words."""
        if self.kind.nominal:
            text = "nominal only: the published code's batch clipping; no formal guarantee"
        elif not self.kind.noises:
            text = "none (no sample-level DP)"
        elif self.unprotected:
            text = "none: a shared part of the released prompt carries no noise (dp.global_dp is off)"
        elif self.effective_sigma == 0:
            text = "none: σ = 0 (target ε = ∞), nothing is noised"
        elif not self.kind.splits_leaves:
            text = "sample-level DP of the whole released prompt (post-processing of the noisy text-feature gradients)"
        else:
            parts = (["local DP on the private leaves"] if self.has_local else []) + (
                ["global DP on the aggregated shared gradient (same batch: one mechanism)"]
                if self.has_shared_global
                else []
            )
            text = "sample-level DP, " + " and ".join(parts)
        if self.seeded and self.epsilon_kind == "accounted":
            text += (
                "; NOT formal: the noise is drawn from the config seed (dp.randomness = 'seeded', an experiment "
                "setting), so anyone holding the config can regenerate and remove it"
            )
        return text

    def parties(self) -> dict[str, str | None]:
        """For each party DESIGN §5 names, None where the sample-level ε holds against it, else why not."""
        if not self.formal():
            why = (
                "the noise is regenerable from the config seed (dp.randomness = 'seeded')"
                if self.seeded
                else self.guarantee()
            )
            return dict.fromkeys(PARTIES, why)
        holds: dict[str, str | None] = dict.fromkeys(PARTIES)
        if self.has_shared_global and not self.distributed:
            why = "it receives the clipped, un-noised shared gradients (global DP is added by the server)"
            holds["server"] = holds["server+colluders"] = why
        elif self.has_shared_global:
            holds["server+colluders"] = None  # noise sized for the honest survivors (secure.colluders)
        return holds

    def client_level_parties(self) -> dict[str, str | None] | None:
        if self.client_sigma == 0:
            return None
        if self.seeded:
            return dict.fromkeys(PARTIES, "the noise is regenerable from the config seed (dp.randomness = 'seeded')")
        holds: dict[str, str | None] = dict.fromkeys(PARTIES)
        if not self.distributed:
            holds["server"] = holds["server+colluders"] = "it receives every client's clipped, un-noised update"
        return holds

    def client_level_event(self) -> str:
        if self.distributed:
            return "Skellam(S) summed by secure aggregation, A per round, no client-sampling amplification (RDP)"
        return "PoissonSampled(p, Gaussian(σ_c/√A))" if self.participation < 1 else "Gaussian(σ_c/√A)"

    def describe(self) -> dict:
        adjacency = "replace one record" if self.sampling == "shuffle" else "add/remove one record"
        if not self.kind.noises and self.client_sigma > 0:
            adjacency, unit = "add/remove one client (all of its data)", "one client"
        else:
            adjacency, unit = f"{adjacency} of the client's training data", "one training record"
        return {
            "mode": self.mode,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "adjacency": adjacency,
            "unit": unit,
            "clip": self.clip,
            "noise_multiplier": self.sigma,
            "global_noise_multiplier": self.sigma_global,
            "effective_noise_multiplier": self.effective_sigma,
            "guarantee": self.guarantee(),
            "nominal": self.kind.nominal,
            "epsilon_kind": self.epsilon_kind,
            "formal_guarantee": self.formal(),
            "randomness": self.randomness,
            "holds_against": self.parties(),
            "public": [*PUBLIC, *self.public],
            "secure_aggregation": None
            if not self.secure_aggregation
            else {
                "distributed_dp": self.distributed,
                "noise_bits": self.secure_noise_bits,
                "colluders": self.colluders,
            },
            "client_level": None
            if self.client_clip == 0
            else {
                "clip": self.client_clip,
                "noise_multiplier": self.client_sigma,
                "participation": self.participation,
                "aggregations_per_round": self.aggregations_per_round,
                "adjacency": "add/remove one client (all of its data)",
                "scope": "every other client's participation, in the shared part of each release; a client's "
                "own local part is a function of its own data, covered only by sample-level DP",
                "event_per_round": self.client_level_event(),
                "formal_guarantee": self.client_level_formal(),
                "holds_against": self.client_level_parties(),
            },
        }


#: the parties each guarantee is stated against (DESIGN §5, "Who learns what")
PARTIES = ("receiver", "other clients", "server", "server+colluders")
#: what every guarantee treats as public: not protected, and not data a neighbouring dataset changes
PUBLIC = ("the class names", "each client's record count")


def plan_privacy(dp: DPConfig, method: MethodLeaves, shape: TrainingShape) -> PrivacyPlan:
    """Calibrate σ for the worst-off client and return the plan (mode 'off' plans no noise); a
    target ε that nothing would meet — no leaf noised — is refused."""
    kind = mode_of(dp)
    has_local = kind.splits_leaves and bool(method.private_leaves)
    has_shared_global = kind.splits_leaves and bool(method.clipped_only) and dp.global_dp
    unprotected = kind.splits_leaves and bool(method.clipped_only) and not dp.global_dp
    weights = [1.0] * len(shape.sizes) if dp.client_clip > 0 else [float(n) for n in shape.sizes]
    max_record_weight = max(w / b for w, b in zip(weights, shape.expected_batch())) if shape.sizes else 0.0
    plan = PrivacyPlan(
        mode=dp.mode,
        delta=dp.delta,
        accountant=dp.accountant,
        sampling=shape.sampling,
        clip=dp.clip,
        batch_size=shape.batch_size,
        sigma=dp.noise_multiplier,
        sigma_global=0.0,
        private_leaves=method.private_leaves,
        has_local=has_local,
        has_shared_global=has_shared_global,
        unprotected=unprotected,
        client_clip=dp.client_clip,
        client_sigma=dp.client_noise_multiplier,
        participation=shape.participation,
        aggregations_per_round=shape.steps_per_round if shape.sync == "step" else 1,
        secure_noise_bits=shape.secure_noise_bits,
        max_record_weight=max_record_weight,
        shared_numel=shape.shared_numel,
        randomness=shape.randomness,
        secure_aggregation=shape.secure_noise_bits is not None,
        colluders=shape.colluders,
        public=method.public,
    )
    if dp.client_noise_multiplier > 0 and not method.shared_leaves:
        raise PrivacyConfigError(
            f"client-level DP cannot protect anything in {method.name}: it shares no parameter, so no aggregate "
            "is noised; leave it out, or use sample-level DP (dp.mode = 'feature' / 'per-sample')"
        )
    if kind.nominal:
        plan.nominal_epsilon = dp.target_epsilon
        plan.sigma = reference_sigma(dp.target_epsilon, dp.delta, shape.rounds)
        return plan
    if not kind.noises:
        return plan
    if unprotected and dp.target_epsilon is not None and math.isfinite(dp.target_epsilon):
        raise PrivacyConfigError(
            f"dp.target_epsilon = {dp.target_epsilon} cannot be met by {method.name}: with dp.mode = "
            f"{dp.mode!r} and dp.global_dp = false its shared leaves ({', '.join(method.clipped_only)}) are "
            "released clipped but un-noised (ε = ∞); set dp.global_dp = true, dp.mode = 'feature', or leave "
            "this method out"
        )
    if dp.target_epsilon is not None and plan.sample_level:
        if plan.secure_noise_bits is not None and has_shared_global:
            plan.sigma = _calibrate_distributed(dp, shape, plan)
        else:
            sigma_eff = _calibrate(dp, shape)
            plan.sigma = sigma_eff * math.sqrt(2) if has_local and has_shared_global else sigma_eff
    if has_shared_global:
        plan.sigma_global = plan.sigma
    return plan


def _calibrate_distributed(dp: DPConfig, shape: TrainingShape, plan: PrivacyPlan) -> float:
    """σ (= σ_G) so that the smallest client, in every round, meets the target under the Skellam
    accounting of distributed DP (bisection on the same charges the run records)."""
    if math.isinf(dp.target_epsilon):
        return 0.0
    size = min(shape.sizes)

    def eps(sigma: float) -> float:
        trial = replace(plan, sigma=sigma, sigma_global=sigma)
        ledger = Accountant("rdp")
        for _ in range(shape.rounds):
            trial.charge_round(ledger, size, shape.steps_per_round)
        return ledger.epsilon(dp.delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > dp.target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyConfigError(f"dp.target_epsilon={dp.target_epsilon} is unreachable with distributed DP")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= dp.target_epsilon else (mid, hi)
    return hi


def _calibrate(dp: DPConfig, shape: TrainingShape) -> float:
    """σ_eff so that every client that takes part in every round meets the target. The smallest client
    is the worst off: its Poisson rate b'/n is the highest, and so is its count of shuffle appearances."""
    if math.isinf(dp.target_epsilon):
        return 0.0
    size = min(shape.sizes)
    if shape.sampling == "poisson":
        q, steps, factor = expected_batch(size, shape.batch_size) / size, shape.steps_per_round, 1.0
    else:
        q, steps, factor = 1.0, appearances_per_round(size, shape.steps_per_round, shape.batch_size), 2.0
    return factor * calibrate_noise(dp.target_epsilon, dp.delta, q, steps * shape.rounds, dp.accountant)
