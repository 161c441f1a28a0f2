"""Loading recipes: YAML + `key=value` overrides, merged onto the schema and validated.

Every problem is reported as one `RecipeError` line naming the key and the allowed values. What a
recipe may contain at all (data only, finite numbers, safe paths) is checked by
`accel.recipe.content`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from accel.io import first_line
from accel.recipe import content
from accel.data_files import RECIPES_DIR
from accel.recipe.schema import Recipe

DEFAULT_RECIPE = "embedded-demo"
GROUPS = ("model", "sampler", "cache", "adapters", "guidance", "inputs", "eval", "output")
WRITTEN_PATHS = ("output.dir",)  # folders a run writes to: inside the working directory unless overridden


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
    names = sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml")
                   if p.parent == RECIPES_DIR or p.parent.name == "templates")
    close = difflib.get_close_matches(name_or_path.removesuffix(".yaml"), names, n=2, cutoff=0.8)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise RecipeError(f"recipe file not found: {name_or_path} ({hint}shipped recipes: {', '.join(names)})")


def _group_options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (RECIPES_DIR / group).glob("*.yaml"))) or "(none)"


def _default_entries(defaults) -> list[tuple[str, str]]:
    """Normalises a `defaults` list: "group/name" strings or {group: name} mappings."""
    if not isinstance(defaults, ListConfig):
        raise RecipeError("defaults: must be a list such as [model/flux-digits, sampler/euler-8]")
    entries = []
    for item in defaults:
        if isinstance(item, DictConfig) and len(item) == 1:
            group, name = next(iter(item.items()))
        elif isinstance(item, str) and item.count("/") == 1:
            group, name = item.split("/")
        else:
            raise RecipeError(f"defaults: entry {item!r} must be 'group/name' or {{group: name}}")
        if group not in GROUPS:
            raise RecipeError(f"defaults: unknown group {group!r}; groups: {', '.join(GROUPS)}")
        content.check_group_entry(str(group), name)
        entries.append((str(group), str(name)))
    return entries


def compose(loaded: DictConfig) -> DictConfig:
    """Merges the recipe's `defaults` group files (accel/recipes/<group>/<name>.yaml) under it.

    Each group file holds the contents of its section; later entries and the recipe's own keys
    override earlier ones.
    """
    if "defaults" not in loaded:
        return loaded
    body = OmegaConf.masked_copy(loaded, [k for k in loaded.keys() if k != "defaults"])
    parts = []
    for group, name in _default_entries(loaded.defaults):
        path = RECIPES_DIR / group / f"{name}.yaml"
        if not path.is_file():
            raise RecipeError(f"defaults: no {group}/{name}.yaml; {group} options: {_group_options(group)}")
        parts.append(OmegaConf.create({group: read_recipe_file(path, mapping=False)}))
    return OmegaConf.merge(*parts, body)


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
    import yaml

    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. sampler.steps=8)")
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as error:
            raise RecipeError(f"cannot parse override {item!r}: {first_line(error)} "
                              "(values are YAML, e.g. a.b=[1, 2] or a.b='text')") from None
    try:
        parsed = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise RecipeError(f"cannot parse overrides {overrides}: {first_line(error)}") from None
    content.check_data_only(parsed, "overrides")
    return parsed


def read_recipe_file(path: Path, mapping: bool = True) -> DictConfig | ListConfig:
    """Reads a recipe YAML file: not empty, data only (`content.check_data_only`).

    Args:
        path: the file.
        mapping: require a mapping of recipe sections (False for a group file, which may hold a list).
    """
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise RecipeError(f"cannot read {path}: {first_line(error)}") from None
    if isinstance(loaded, DictConfig) and len(loaded) == 0:
        raise RecipeError(f"{path} is empty; a recipe names at least its sections (see docs/recipes.md)")
    if mapping and not isinstance(loaded, DictConfig):
        raise RecipeError(f"{path} must hold a mapping of recipe sections, got {type(loaded).__name__}")
    content.check_data_only(loaded, str(path))
    return loaded


def merge_on_schema(schema_class: type, *parts: DictConfig) -> DictConfig:
    """Merges `parts` onto the structured schema; a bad key or type becomes one RecipeError line."""
    schema = OmegaConf.structured(schema_class)
    try:
        return OmegaConf.merge(schema, *parts)
    except OmegaConfBaseException as error:
        raise RecipeError(_describe(error, schema)) from None


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None, *,
                calibrated: bool = True) -> DictConfig:
    """Loads, merges and validates a recipe.

    Args:
        name_or_path: a YAML file, a shipped recipe name, or None for the default recipe.
        overrides: `key=value` strings applied last.
        calibrated: replace the recipe's `calibrated` markers by its calibration file's values
            (`accel.calibration.calibrated_recipe`); False keeps them (`accel calibrate`).

    Returns:
        The validated recipe as a structured DictConfig (typed by `Recipe`).

    Raises:
        RecipeError: one line naming the key and what is allowed.
    """
    path = find_recipe(name_or_path)
    parsed = parse_overrides(overrides or [])
    recipe = merge_on_schema(Recipe, compose(read_recipe_file(path)), parsed)
    content.check_finite(recipe)
    content.check_written_paths(recipe, parsed, WRITTEN_PATHS, str(path))
    from accel.recipe.validate import validate_recipe

    validate_recipe(recipe)
    if calibrated:
        from accel.calibration import calibrated_recipe

        recipe = calibrated_recipe(recipe)
    return recipe


def recipe_from_mapping(mapping: Any) -> DictConfig:
    """Validates a recipe given as a dict or an unvalidated DictConfig (e.g. `accel.apply(pipe,
    {"sampler": {...}, "cache": {...}})`) exactly as a recipe file: data only, the schema's
    defaults for missing sections, finite numbers, every field checked.

    Raises:
        RecipeError: one line naming the key and what is allowed.
    """
    try:
        loaded = mapping if OmegaConf.is_config(mapping) else OmegaConf.create(dict(mapping))
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        raise RecipeError(f"the given recipe is not a mapping of recipe sections: {first_line(error)}") from None
    content.check_data_only(loaded, "the given recipe")
    recipe = merge_on_schema(Recipe, compose(loaded))
    content.check_finite(recipe)
    from accel.recipe.validate import validate_recipe

    validate_recipe(recipe)
    return recipe


def list_recipes() -> dict[str, list[str]]:
    """Shipped recipes: top-level names and, per group, the group options."""
    listing = {"recipes": sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))}
    for group in GROUPS:
        options = sorted(p.stem for p in (RECIPES_DIR / group).glob("*.yaml"))
        if options:
            listing[group] = options
    for sub in sorted(p for p in RECIPES_DIR.iterdir() if p.is_dir() and p.name not in GROUPS):
        listing[sub.name] = sorted(f"{sub.name}/{p.stem}" for p in sub.glob("*.yaml"))
    return listing


def to_yaml(recipe: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(recipe, resolve=True)
