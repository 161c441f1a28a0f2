"""Loading recipes: YAML + `key=value` overrides, merged onto the schema and validated.

Every problem is reported as one `RecipeError` line naming the key and the allowed values.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from accel.recipe.schema import Recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "embedded-demo"


class RecipeError(ValueError):
    """A recipe problem a user can fix; its message is one line."""


def find_recipe(name_or_path: str | None) -> Path:
    """Resolves a recipe path, or a shipped recipe name (e.g. "embedded-demo")."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe file not found: {name_or_path} (shipped recipes: {available})")


def _allowed_keys(node) -> str:
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    return ", ".join(str(k) for k in keys) or "(none)"


def _describe(error: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError):
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        return f"unknown key '{key}'; allowed keys here: {_allowed_keys(parent)}"
    if isinstance(error, ValidationError):
        return f"wrong type for '{key}': {str(error).splitlines()[0]}"
    return f"invalid recipe at '{key}': {str(error).splitlines()[0]}"


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Parses `a.b=value` strings (values in YAML syntax) into a config."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. sampler.steps=8)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise RecipeError(f"cannot parse overrides {overrides}: {str(error).splitlines()[0]}") from None


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Loads, merges and validates a recipe.

    Args:
        name_or_path: a YAML file, a shipped recipe name, or None for the default recipe.
        overrides: `key=value` strings applied last.

    Returns:
        The validated recipe as a structured DictConfig (typed by `Recipe`).

    Raises:
        RecipeError: one line naming the key and what is allowed.
    """
    path = find_recipe(name_or_path)
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml errors come in many classes
        raise RecipeError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"{path} must hold a mapping of recipe sections, got {type(loaded).__name__}")
    schema = OmegaConf.structured(Recipe)
    try:
        recipe = OmegaConf.merge(schema, loaded, parse_overrides(overrides or []))
    except OmegaConfBaseException as error:
        raise RecipeError(_describe(error, schema)) from None
    from accel.recipe.validate import validate_recipe

    validate_recipe(recipe)
    return recipe


def to_yaml(recipe: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(recipe, resolve=True)
