"""The training-recipe schema (`accel train RECIPE`): model, objective, loop settings, output.

The `model` section is the run recipes' (`accel.recipe.schema.ModelConfig`: an embedded name, a
local pipeline folder or a cached hub id, dtype, device, from_pretrained options); the
distillation objectives train on that pipeline. The `train` section has exactly the fields of
`distill.training.TrainConfig` (less its folders, which come from `output`), built from that
dataclass so the two cannot drift apart; values are checked by TrainConfig's own validation. The objective is chosen by name from
`accel.train.OBJECTIVES` and its `params` are checked by that objective's builder. Every field is
documented in docs/recipes.md (tests/test_recipes.py checks it).
"""

from __future__ import annotations

import typing
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from accel.recipe.schema import ModelConfig
from distill.training import TrainConfig

_FOLDERS = ("out_dir", "export_dir")
# Folders a training run writes to: inside the working directory unless given as an override.
WRITTEN_PATHS = ("output.dir", "objective.params.trajectories")


def _train_section() -> type:
    """A structured-config dataclass with TrainConfig's fields, types and defaults (betas as a list)."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for spec in fields(TrainConfig):
        if spec.name in _FOLDERS or not spec.init:
            continue
        kind = list[float] if spec.name == "betas" else hints[spec.name]
        if spec.default is NO_DEFAULT:
            specs.append((spec.name, kind, field(default=MISSING)))
        elif isinstance(spec.default, tuple):
            specs.append((spec.name, kind, field(default_factory=lambda value=spec.default: list(value))))
        else:
            specs.append((spec.name, kind, field(default=spec.default)))
    return make_dataclass("TrainSection", specs)


TrainSection = _train_section()


@dataclass
class ObjectiveSection:
    """Which objective to train, by registry name, and its parameters."""

    name: str = MISSING  # a name from accel.train.OBJECTIVES
    params: dict[str, Any] = field(default_factory=dict)  # checked by the objective's builder


@dataclass
class TrainOutputSection:
    """Where the run goes."""

    dir: str = "runs"  # the run is written to <dir>/<name>/


@dataclass
class TrainRecipe:
    """A training run: model, objective, loop settings and output folder."""

    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)  # the pipeline step-distill / cache-aware / router train on
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSection = field(default_factory=TrainSection)  # type: ignore[valid-type]
    output: TrainOutputSection = field(default_factory=TrainOutputSection)


def train_config(recipe: DictConfig) -> TrainConfig:
    """The loop's TrainConfig for a loaded recipe (files under <output.dir>/<name>/).

    Raises:
        RecipeError: a train.* value TrainConfig refuses, as one line naming the key.
    """
    from accel.recipe.load import RecipeError

    values = OmegaConf.to_container(recipe.train, resolve=True)
    values["betas"] = tuple(values["betas"])
    out_dir = Path(recipe.output.dir) / recipe.name
    try:
        return TrainConfig(**values, out_dir=out_dir, export_dir=out_dir / "export")
    except ValueError as error:
        raise RecipeError(f"train.{error}") from None


def load_train_recipe(name_or_path: str, overrides: list[str] | None = None) -> DictConfig:
    """Loads a training recipe: YAML merged on the schema, then `key=value` overrides, validated.

    Raises:
        RecipeError: one line naming the key and what is allowed.
    """
    from accel.recipe import content
    from accel.recipe.load import RecipeError, find_recipe, merge_on_schema, parse_overrides, read_recipe_file
    from accel.train import OBJECTIVES

    path = find_recipe(name_or_path)
    parsed = parse_overrides(overrides or [])
    recipe = merge_on_schema(TrainRecipe, read_recipe_file(path), parsed)
    missing = [key for key in ("name", "objective.name", "train.steps") if OmegaConf.select(recipe, key) is None]
    if missing:
        raise RecipeError(f"{missing[0]}: missing; a training recipe must set name, objective.name and train.steps")
    content.check_finite(recipe)
    content.check_path_component(recipe.name, "name")
    content.check_written_paths(recipe, parsed, WRITTEN_PATHS, str(path))
    if recipe.objective.name not in OBJECTIVES:
        raise RecipeError(f"objective.name: {recipe.objective.name!r} is not allowed; "
                          f"choose one of: {', '.join(sorted(OBJECTIVES))}")
    train_config(recipe)
    return recipe
