"""Differential privacy for pfpl: accounting (opacus RDP / PRV, dp-accounting RDP) and validation."""

from __future__ import annotations

from pfpl.privacy.accounting import (
    ACCOUNTANTS,
    Mechanism,
    PrivacyConfigError,
    calibrate_noise,
    epsilon,
    epsilon_curve,
    validate,
)

__all__ = [
    "ACCOUNTANTS",
    "Mechanism",
    "PrivacyConfigError",
    "calibrate_noise",
    "epsilon",
    "epsilon_curve",
    "validate",
]
