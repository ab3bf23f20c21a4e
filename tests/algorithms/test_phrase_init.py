"""prompt.init = a phrase: every method's released prompt starts as the zero-shot classifier."""

import pytest
import torch

from pfpl.backbones import PromptTower
from pfpl.config import load_config
from pfpl.errors import ConfigError
from pfpl.evaluation.zeroshot import zero_shot_text_features
from pfpl.federation.context import Benchmark
from pfpl.prompts.coop import phrase_context

SMALL = [
    "federation.n_clients=5",
    "federation.local_steps=1",
    "federation.batch_size=8",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "data.test_per_class_domain=1",
    "prompt.init='a photo of a'",
    "train.rank=2",
    "fedsp.distill_steps=2",
    "federation.sync='fedavg'",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phrase")
    cfg = load_config(None, SMALL + [f"cache_dir='{tmp / 'cache'}'", f"output_dir='{tmp / 'runs'}'"])
    return Benchmark(cfg)


@pytest.mark.parametrize("method", ["coop", "promptfl", "fedotp-lite", "fedpgp", "dpfpl", "secfpp", "fedsp"])
def test_step_zero_is_zero_shot(bench, method):
    sim, _ = bench.engine(method)
    released = sim.text_features()  # [N, C, E] before any step
    zero_shot = bench.reference.to(released.device)
    assert torch.allclose(released, zero_shot.expand_as(released), atol=1e-5)
    assert bench.evaluate(released) == bench.evaluate(zero_shot.expand_as(released).clone())


def test_dplora_does_not_start_at_zero_shot(bench):
    """DP-LoRA's forward is global + u·v with orthonormal u, v (DESIGN §1): its local part cannot be
    zero, so it starts away from the phrase (documented in docs/design-notes.md)."""
    sim, _ = bench.engine("dplora")
    released = sim.text_features()
    assert not torch.allclose(released, bench.reference.to(released.device).expand_as(released), atol=1e-3)


def test_phrase_context_reproduces_the_template_on_an_open_clip_tokenizer(tiny, classes):
    tower = PromptTower(tiny, classes, 4)
    ctx = phrase_context(tiny, "a photo of a", 4)
    assert ctx.shape == (4, tiny.ctx_dim)
    expected = zero_shot_text_features(tiny, classes, "a photo of a {}.")
    assert torch.allclose(tower(ctx)[0], expected, atol=1e-5)


def test_phrase_of_more_tokens_than_words_is_one_line(tiny):
    with pytest.raises(ConfigError, match=r"prompt.init = 'a photograph-like' is \d+ tokens"):
        phrase_context(tiny, "a photograph-like", 2)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["prompt.init='a photo of a'", "prompt.n_ctx=16"], "set prompt.n_ctx = 4"),
        (["prompt.init='a photo of a {}'"], "without the {} slot"),
        (["prompt.init='  '"], "must be 'random' or a phrase"),
        (["prompt.init='a photo of a'"], "train.rank = 8 must be at most prompt.n_ctx = 4"),
    ],
)
def test_bad_init_is_one_line(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        load_config(None, overrides)


def test_phrase_sets_n_ctx_and_random_stays_the_default():
    assert load_config(None, ["prompt.init='a photo of a'", "train.rank=4"]).prompt.n_ctx == 4
    cfg = load_config(None, [])
    assert cfg.prompt.init == "random" and cfg.prompt.phrase is None and cfg.prompt.n_ctx == 16
