"""PromptFolio: the classifier is the portfolio (1 − θ)·T_global + θ·T_local of two prompts' features."""

from __future__ import annotations

import pytest
import torch

from pfpl.algorithms import get_method, spec
from pfpl.algorithms.base import MethodSettings
from pfpl.backbones.prompt_tower import PromptTower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(tiny, classes, theta: float):
    method = get_method("promptfolio")(MethodSettings(init_std=0.1, extra={"promptfolio_theta": theta}))
    tower = PromptTower(tiny, classes, n_ctx=2)
    gen = torch.Generator().manual_seed(0)
    dim = tiny.ctx_dim
    params = {
        "global": method.init_shared(2, dim, gen)["global"].expand(3, 2, dim).clone(),
        "local": torch.stack([method.init_local(2, dim, gen)["local"] for _ in range(3)]),
    }
    gens = [torch.Generator() for _ in range(3)]
    with torch.no_grad():
        mixed = method.release_features(tower, params, gens)
        alone_global = tower(params["global"][:, None])
        alone_local = tower(params["local"][:, None])
    return mixed, alone_global, alone_local


def test_the_portfolio_is_the_global_prompt_at_0_and_the_local_prompt_at_1(tiny, classes):
    mixed, g, local = _features(tiny, classes, 0.0)
    assert torch.allclose(mixed, g, atol=1e-6)
    assert not torch.allclose(mixed, local, atol=1e-3)  # the two prompts differ: the test can fail
    mixed, g, local = _features(tiny, classes, 1.0)
    assert torch.allclose(mixed, local, atol=1e-6)
    mixed, g, local = _features(tiny, classes, 0.4)
    assert torch.allclose(mixed, 0.6 * g + 0.4 * local, atol=1e-6)


def test_its_classifier_is_not_one_context():
    assert not spec("promptfolio").one_context  # export / audit refuse it (one line, tested in test_new_methods)
