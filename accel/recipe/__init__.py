"""Recipes: the schema, loading with overrides, and validation."""

from accel.recipe.load import DEFAULT_RECIPE, RECIPES_DIR, RecipeError, find_recipe, load_recipe, to_yaml
from accel.recipe.schema import Recipe

__all__ = ["DEFAULT_RECIPE", "RECIPES_DIR", "Recipe", "RecipeError", "find_recipe", "load_recipe", "to_yaml"]
