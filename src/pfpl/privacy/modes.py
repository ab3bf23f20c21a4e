"""The privacy modes as objects the rest of pfpl asks (DESIGN §5), instead of comparing strings.

A sample-level mode (``dp.mode``) says whether it adds noise, whether its ε is a formal bound,
which client-side gradient mechanism it builds, how its noise splits between client and server,
where ``dp.clip_quantile`` measures gradient norms, and what it refuses. :func:`is_private` is
pfpl's one definition of a private run; :func:`secret_randomness` says whether the run's mechanism
draws come from the parties' secrets (``dp.randomness``).

Importable without torch (the config and the CLI's checks use it): mechanisms are imported when a
plan builds one. A new sample-level mechanism is a :class:`~pfpl.privacy.mechanisms.GradientMechanism`
with a ``from_plan`` constructor and one entry in :data:`MODES`; the config's ``dp.mode`` choices come
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

#: the methods of the published DP-FPL code, which ``reference`` mode reproduces (it has no DP CoOp)
REFERENCE_METHODS = ("promptfl", "fedotp-lite", "fedpgp", "dplora", "dpfpl")


@dataclass(frozen=True)
class SampleMode:
    """One value of ``dp.mode``."""

    name: str
    summary: str  # one line, for the config's help and the docs
    noises: bool  # adds noise to the records' contributions (a private mode)
    formal: bool  # its accounted ε is a formal (ε, δ) bound (False: none, or nominal only)
    mechanism: str  # "Class" in pfpl.privacy.mechanisms: the client update's gradient mechanism
    # per-sample: the client noises the private leaves and clips the shared ones, whose noise is the
    # server's global DP; otherwise the client's mechanism covers every leaf it sends
    splits_leaves: bool = False
    clip_space: str | None = None  # where dp.clip_quantile measures per-record norms (None: not supported)
    nominal: bool = False  # prints a nominal ε (the published code's, no guarantee)
    methods: tuple[str, ...] | None = None  # the methods it runs (None: every method)
    secure_aggregation: bool = True  # whether it can run under secure aggregation
    server_noise: str | None = None  # "Class" in pfpl.privacy.aggregation the server adds (reference)

    def gradient_mechanism(self, plan: Any):
        """The client-side mechanism for a privacy plan."""
        cls = getattr(import_module("pfpl.privacy.mechanisms"), self.mechanism)
        return cls.from_plan(plan)

    @property
    def epsilon_kind(self) -> str:
        return "nominal" if self.nominal else ("accounted" if self.formal else "none")


MODES: dict[str, SampleMode] = {
    m.name: m
    for m in (
        SampleMode("off", "no sample-level DP", noises=False, formal=False, mechanism="BatchMean"),
        SampleMode(
            "feature",
            "clip/noise each record's gradient w.r.t. the class text features; the whole prompt is post-processing",
            noises=True,
            formal=True,
            mechanism="FeatureDP",
            clip_space="feature",
        ),
        SampleMode(
            "per-sample",
            "exact per-record gradients: private leaves noised on the client, shared ones by the server's global DP",
            noises=True,
            formal=True,
            mechanism="PerSampleDP",
            splits_leaves=True,
            clip_space="context",
        ),
        SampleMode(
            "reference",
            "the published DP-FPL code's batch clipping (nominal ε, no guarantee)",
            noises=True,
            formal=False,
            mechanism="BatchClipReference",
            nominal=True,
            methods=REFERENCE_METHODS,
            secure_aggregation=False,
            server_noise="ReferenceServerNoise",
        ),
    )
}
DP_MODES: tuple[str, ...] = tuple(MODES)


def mode_of(dp: Any) -> SampleMode:
    """The sample-level mode of a ``DPConfig`` (or of its ``mode`` string)."""
    return MODES[dp if isinstance(dp, str) else dp.mode]


def is_private(dp: Any) -> bool:
    """Whether a run with this ``DPConfig`` runs any DP mechanism (sample-level or client-level noise):
    then only mechanism outputs leave a client and data-dependent diagnostics stay unpublished."""
    return mode_of(dp).noises or dp.client_noise_multiplier > 0


def secret_randomness(dp: Any) -> bool:
    """Whether the run's mechanism draws come from the parties' own secrets (a private run with
    ``dp.randomness = 'secret'``, the default) rather than from the config seed."""
    return is_private(dp) and dp.randomness == "secret"
