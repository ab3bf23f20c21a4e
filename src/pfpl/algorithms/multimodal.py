"""What the vision-prompt methods (VPT, IVLP, MaPLe, DP-FPL on the image tower) share: the shape of
their vision prompts, and the frozen hand-crafted text classifier of a method that prompts only the
image tower (the template's class text features, computed once per tower)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pfpl.algorithms.base import Method, MethodSettings, Views, normal

if TYPE_CHECKING:
    from pfpl.backbones.prompt_tower import PromptTower


def vision_shape(settings: MethodSettings, method: str) -> tuple[int, int, int]:
    """``(depth, tokens, width)`` of one vision prompt set; an error where the run set up none."""
    if settings.vision_shape is None:
        raise ValueError(f"{method} prompts the image tower but the run set up no vision prompts (vision_shape)")
    return tuple(settings.vision_shape)  # type: ignore[return-value]


def random_vision(settings: MethodSettings, method: str, gen: torch.Generator) -> torch.Tensor:
    """A vision prompt set drawn N(0, init_std²) (there is no phrase to start a vision prompt from)."""
    return normal(vision_shape(settings, method), settings.init_std, gen)


def placeholder_context(like: torch.Tensor) -> torch.Tensor:
    """``[B, 0, 0]``: the (empty) text context of a method whose text classifier is frozen."""
    return like.new_zeros(like.shape[0], 0, 0)


class FrozenText(Method):
    """A method whose text side is the hand-crafted template's class text features (frozen); it learns
    vision prompts only. Its released context is empty; its release is its vision prompts."""

    def template_features(self, tower: PromptTower) -> torch.Tensor:
        """``[C, E]`` the template's class text features, computed once per tower."""
        cached = self.__dict__.get("_template")
        if cached is None or cached[0] is not tower:
            from pfpl.evaluation.zeroshot import zero_shot_text_features

            cached = (tower, zero_shot_text_features(tower.backbone, tower.classnames, self.settings.template))
            self.__dict__["_template"] = cached
        return cached[1]

    def text_features(self, tower: PromptTower, views: Views) -> torch.Tensor:
        feats = self.template_features(tower)
        return feats[None].expand(views.ctx.shape[0], *feats.shape)

    def release_features(self, tower, params, gens):
        feats = self.template_features(tower)
        return feats[None].expand(len(gens), *feats.shape).clone()
