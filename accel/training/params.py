"""Objective parameters from a training recipe: typed, with one-line errors naming objective.params.<key>."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def objective_params(schema: type, params: Any, objective: str) -> Any:
    """Merges `params` onto the dataclass `schema`; returns a typed object.

    Raises:
        RecipeError: an unknown key or a wrong type, named as objective.params.<key>.
    """
    from accel.recipe.load import RecipeError

    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, params if params is not None else {})
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        if "not in struct" in str(error) or type(error).__name__ == "ConfigKeyError":
            raise RecipeError(f"unknown key 'objective.params.{key}' for objective {objective!r}; "
                              f"allowed keys here: {', '.join(base.keys())}") from None
        raise RecipeError(f"wrong type for 'objective.params.{key}': {str(error).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def plain_params(params: Any) -> dict[str, Any]:
    """A recipe's objective.params as a plain dict."""
    return OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})


def checked(build: Callable[[], Any], key: str = "") -> Any:
    """Runs `build`; its ValueError / TypeError becomes a RecipeError naming objective.params."""
    from accel.recipe.load import RecipeError

    try:
        return build()
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecipeError(f"objective.params.{key + ': ' if key else ''}{first}") from None
