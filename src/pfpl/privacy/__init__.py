"""Differential privacy for pfpl: accounting (opacus RDP / PRV, dp-accounting RDP) and validation."""

from __future__ import annotations

from pfpl.privacy.accounting import *  # noqa: F403 - the public accounting API, as listed in its __all__
from pfpl.privacy.accounting import __all__  # noqa: F401
