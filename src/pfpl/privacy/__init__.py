"""Differential privacy (Opacus's split): sample-level gradient mechanisms (:mod:`.mechanisms`),
server-side DP aggregators (:mod:`.aggregation`), accountants (:mod:`.accounting`) and a run's
privacy plan (:mod:`.plan`)."""

from __future__ import annotations

from pfpl.privacy.accounting import *  # noqa: F403 - the public accounting API, as listed in its __all__
from pfpl.privacy.accounting import __all__  # noqa: F401
