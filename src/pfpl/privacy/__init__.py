"""Differential privacy (Opacus's split): sample-level gradient mechanisms (:mod:`.mechanisms`),
server-side DP aggregators (:mod:`.aggregation`), accountants (:mod:`.accounting`), the
combinations pfpl accepts (:mod:`.rules`, importable without torch) and a run's privacy plan
(:mod:`.plan`)."""
