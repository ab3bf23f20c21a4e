"""Linear probe on frozen image features: the ceiling that prompt learning works under."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfpl.data.features import Features


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, steps: int = 100) -> torch.nn.Linear:
    torch.manual_seed(0)
    clf = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe(
    train: Features,
    val: Features,
    test: Features,
    n_classes: int,
    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2),
) -> dict:
    """Multinomial logistic regression; the L2 strength is chosen on ``val``. Returns accuracies."""
    mean = train.features.mean(0, keepdim=True)
    std = train.features.std(0, keepdim=True) + 1e-6
    norm = lambda f: (f - mean) / std
    best = None
    for l2 in l2_grid:
        clf = _fit(norm(train.features), train.labels, n_classes, l2)
        with torch.no_grad():
            acc = float((clf(norm(val.features)).argmax(-1) == val.labels).float().mean())
        if best is None or acc > best[0]:
            best = (acc, l2, clf)
    acc, l2, clf = best
    with torch.no_grad():
        pred = clf(norm(test.features)).argmax(-1)
    return {"accuracy": float((pred == test.labels).float().mean()), "val_accuracy": acc, "l2": l2, "pred": pred}
