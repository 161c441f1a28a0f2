"""What `accel.apply` accepts as a stack, and the recipe's model dtype and device on a user's pipeline.

`accel.apply(pipe, x)` takes a `Stack`, a loaded recipe, a shipped recipe name or a recipe YAML
path. A recipe also says `model.dtype` and `model.device`; null (the default) leaves the pipeline
as the user loaded it. A device is applied (`pipe.to(device)`, moved back by `accel.remove`); a
dtype is checked, never converted, because a conversion could not be undone exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from accel.stack import Stack, StackError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPlacement:
    """The dtype and device a recipe asks for (None: the pipeline's own)."""

    dtype: str | None = None
    device: str | None = None


def stack_and_placement(stack_or_recipe: Any, pipe: Any = None) -> tuple[Stack, ModelPlacement]:
    """The Stack and the model placement named by a Stack, a recipe (validated, or a dict of recipe
    sections validated here), or a recipe name / path.

    A recipe's `calibrated` markers are replaced by its calibration file's values, and the file
    must have been made for `pipe`'s weights (`accel.calibration.calibrated_recipe`).

    Raises:
        StackError: neither a Stack nor a recipe; a recipe that does not load is a RecipeError.
    """
    if isinstance(stack_or_recipe, Stack):
        return stack_or_recipe, ModelPlacement()
    from omegaconf import OmegaConf

    from accel.recipe.schema import Recipe

    recipe = stack_or_recipe
    if isinstance(recipe, str) or hasattr(recipe, "__fspath__"):
        from accel.recipe import load_recipe

        recipe = load_recipe(str(recipe))
    elif isinstance(recipe, Mapping) or (OmegaConf.is_dict(recipe) and OmegaConf.get_type(recipe) is not Recipe):
        from accel.recipe.load import recipe_from_mapping

        recipe = recipe_from_mapping(recipe)  # a plain dict: validated like a recipe file
    if hasattr(recipe, "sampler") and hasattr(recipe, "cache"):
        if not OmegaConf.is_config(recipe):
            recipe = OmegaConf.structured(recipe)
        if "calibration" in recipe:
            from accel.calibration import calibrated_recipe

            recipe = calibrated_recipe(recipe, pipe)
        model = recipe.get("model") or {}
        placement = ModelPlacement(model.get("dtype"), model.get("device"))
        return Stack.from_recipe(recipe), placement
    raise StackError(f"accel.apply needs a Stack, a recipe (accel.load_recipe(name, overrides), or a dict of recipe "
                     f"sections), a shipped recipe name or a recipe path, got {type(stack_or_recipe).__name__}")


def _parameter(module: torch.nn.Module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None)


def _is_offloaded(pipe: Any) -> bool:
    """Whether the pipeline's models are moved by offloading hooks (accelerate or group offloading)."""
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            if hasattr(component, "_hf_hook"):
                return True
            registry = getattr(component, "_diffusers_hook", None)
            if registry is not None and any("offload" in name for name in registry.hooks):
                return True
    return False


def place_pipeline(pipe: Any, denoiser: torch.nn.Module, placement: ModelPlacement) -> torch.device | None:
    """Checks the recipe's dtype and applies its device.

    Returns:
        The device the pipeline was on before it was moved, or None when it was not moved.

    Raises:
        StackError: a dtype other than the denoiser's, an unknown or unavailable device, or a
            device change on an offloaded pipeline.
    """
    owner = type(pipe).__name__
    weight = _parameter(denoiser)
    if placement.dtype is not None:
        if placement.dtype not in DTYPES:
            raise StackError(f"model.dtype: {placement.dtype!r}; use one of {', '.join(DTYPES)} or null")
        if weight is not None and weight.is_floating_point() and weight.dtype != DTYPES[placement.dtype]:
            have = str(weight.dtype).replace("torch.", "")
            raise StackError(f"model.dtype={placement.dtype} but {owner}'s denoiser is {have}; load the pipeline "
                             f"with torch_dtype=torch.{placement.dtype} or set model.dtype={have} (apply does not "
                             "convert weights: remove could not restore them exactly)")
    if placement.device is None:
        return None
    try:
        wanted = torch.device(placement.device)
    except (RuntimeError, ValueError):
        raise StackError(f"model.device: {placement.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise StackError(f"model.device={placement.device} but CUDA is not available here; set model.device=cpu")
    current = getattr(pipe, "device", None) or (weight.device if weight is not None else torch.device("cpu"))
    if _same_device(current, wanted):
        return None
    if _is_offloaded(pipe):
        execution = getattr(pipe, "_execution_device", current)
        if _same_device(execution, wanted):
            return None
        raise StackError(f"model.device={placement.device} but {owner} is offloaded to run on {execution}; "
                         f"set model.device={execution} or null")
    pipe.to(wanted)
    return torch.device(current)


def _same_device(have: torch.device, wanted: torch.device) -> bool:
    """Same type, and the same index where `wanted` names one (no index: the current device)."""
    have = torch.device(have)
    return have.type == wanted.type and (wanted.index is None or (have.index or 0) == wanted.index)
