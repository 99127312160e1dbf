"""A :class:`blip_core.recipe.Recipe` as the Dagster run config of the lineage's assets."""

from __future__ import annotations

from typing import Any

from assets.capfilt import CaptionSettings, CorpusSettings
from assets.evals import EvalSettings
from assets.models import CaptionerSettings, FilterSettings, PretrainSettings
from blip_core.recipe import Recipe


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """Each configurable asset's settings under ``recipe``, by asset name.

    Raises:
        ValueError: the recipe asks for what the assets do not do (more than one round).
    """
    if recipe.rounds != 1:
        raise ValueError(f"the Dagster lineage runs one bootstrap round, the recipe asks for "
                         f"{recipe.rounds}; blip-core bootstrap runs several")
    return {
        "pretrained_med": PretrainSettings.from_recipe(recipe, "pretrain"),
        "captioner": CaptionerSettings.from_recipe(recipe, "captioner"),
        "filter": FilterSettings.from_recipe(recipe, "filter"),
        "synthetic_captions": CaptionSettings.from_recipe(recipe),
        "bootstrapped_corpus": CorpusSettings.from_recipe(recipe),
        "bootstrapped_med": PretrainSettings.from_recipe(recipe, "pretrain"),
        "downstream_evals": EvalSettings.from_recipe(recipe),
    }


def recipe_run_config(recipe: Recipe) -> dict[str, Any]:
    """``{"ops": {asset: {"config": ...}}}``: the run config that makes the assets run ``recipe``."""
    return {"ops": {name: {"config": settings.model_dump()}
                    for name, settings in recipe_settings(recipe).items()}}
