"""Membership-inference audits of released prompts (``pfpl audit``, docs/audit.md): an application
of the engine, above it. :mod:`.attacks` scores, :mod:`.metrics` summarises, :mod:`.audit` trains
the shadows and audits run folders."""

from __future__ import annotations

from pfpl.errors import AuditError

DEFAULT_SHADOWS = 8
MIN_SHADOWS = 4  # LiRA shadows per target: complementary pairs put every record in 2 and out of 2


def check_shadows(k: int) -> None:
    if k < MIN_SHADOWS:
        raise AuditError(
            f"--shadows must be at least {MIN_SHADOWS} (LiRA fits per-record Gaussians: every record "
            f"needs 2 shadows that trained on it and 2 that did not), got {k}"
        )
