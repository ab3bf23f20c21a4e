"""Learning rate and momentum for private runs, per mechanism and target ε.

DP noise does not shrink with the learning rate's step the way the signal does: the step that trains
a prompt well without noise (lr 0.02) moves it by the noise far past anything the model knows. The
values below were chosen on the **val split** of the embedded benchmark (``configs/sweep.toml``; every
run reports its val accuracy): among learning rates {1e-4, 3e-4, 1e-3, 3e-3} per ε, the one whose best
personalised method has the highest val local accuracy while no method falls more than 1 point
below zero-shot; where no candidate keeps that, the one with the highest worst method
(docs/results.md lists every candidate). Momentum stayed at 0.9 (not tuned). They cost the training records nothing: the
embedded benchmark is pfpl's own synthetic data, not a user's. A user who tunes on their own
private data must account for it (docs/privacy.md). A target ε between two rows takes the row
nearest on a log scale.
"""

from __future__ import annotations

import math

#: dp.mode -> ((target ε, learning rate, momentum), ...) in increasing ε
PRIVATE_SGD: dict[str, tuple[tuple[float, float, float], ...]] = {
    "per-sample": ((0.1, 0.0001, 0.9), (1.0, 0.001, 0.9), (4.0, 0.001, 0.9)),
    "feature": ((0.1, 0.0001, 0.9), (1.0, 0.0003, 0.9), (4.0, 0.0003, 0.9)),
}


def private_sgd(mode: str, target_epsilon: float) -> tuple[float, float] | None:
    """(learning rate, momentum) for ``mode`` at ``target_epsilon``; None where pfpl has no default
    (the reference mode, or no target ε)."""
    rows = PRIVATE_SGD.get(mode)
    if not rows or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        return None
    _, lr, momentum = min(rows, key=lambda row: abs(math.log(row[0] / target_epsilon)))
    return lr, momentum
