"""Shipped files are found through the installed package, from any working directory; recipes name
shipped data files `embedded:...` and nothing resolves through a source tree."""

from __future__ import annotations

from pathlib import Path

import pytest

import accel
from accel.cli import main
from accel.data_files import (EMBEDDED_WEIGHTS_DIR, RECIPES_DIR, DataFileError, embedded_name,
                              resolve_data_file)
from accel.recipe import load_recipe
from accel.recipe.load import read_recipe_file
from accel.stack import Stack

PACKAGE = Path(accel.__file__).resolve().parent


def _shipped_recipe_names() -> list[str]:
    """Every shipped run, ablation, template and training recipe by its shipped name (group files
    such as sampler/unipc-6-optimized are loaded through the recipes naming them; launch configs
    are not recipes)."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml")
                  if p.parent == RECIPES_DIR or p.parent.name in ("ablations", "templates", "train"))


def _paths_in(node) -> list[str]:
    """Every value under a key named `path` in a plain recipe container."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [str(value)] if key == "path" and value is not None else _paths_in(value)
    elif isinstance(node, list):
        for item in node:
            found += _paths_in(item)
    return found


def test_recipes_and_weights_live_inside_the_package():
    assert RECIPES_DIR == PACKAGE / "recipes" and EMBEDDED_WEIGHTS_DIR == PACKAGE / "embedded" / "weights"
    assert (RECIPES_DIR / "embedded-demo.yaml").is_file()
    assert (RECIPES_DIR / "launch" / "accelerate-cpu-2proc.yaml").is_file()
    assert not (PACKAGE.parent / "recipes").exists()  # no second copy beside the package


def test_every_shipped_recipe_loads_from_another_working_directory(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from accel.lab.ablate import cell_recipe, grid_cells
    from accel.recipe.train_schema import load_train_recipe

    monkeypatch.chdir(tmp_path)
    names = _shipped_recipe_names()
    assert {"embedded-demo", "embedded-calibrated-cache", "ablations/embedded-schedules", "train/router"} <= set(names)
    walks = []
    for name in names:
        raw = OmegaConf.to_container(read_recipe_file(RECIPES_DIR / f"{name}.yaml"))
        # a shipped recipe names shipped data files only through the package scheme
        assert all(p.startswith("embedded:") for p in _paths_in(raw)), name
        if "objective" in raw:
            load_train_recipe(name)
            continue
        recipe = load_recipe(name)
        cells = [cell_recipe(recipe, cell) for cell in grid_cells(recipe)] if "ablation" in raw else []
        for each in [recipe, *cells]:
            sampler = Stack.from_recipe(each).sampler
            if sampler.schedule == "optimized":
                walks.append(Path(sampler.schedule_params["path"]))
    # the optimised walks of ablations/embedded-schedules, resolved inside the installed package
    assert sorted({p.name for p in walks}) == ["unipc_bh2-nfe6.json", "unipc_bh2-nfe8.json"]
    assert all(p.is_file() and p.is_relative_to(EMBEDDED_WEIGHTS_DIR) for p in walks)
    composed = tmp_path / "optimized.yaml"  # the sampler group file naming a walk, composed from here
    composed.write_text("defaults: [model/flux-digits, sampler/unipc-6-optimized, eval/embedded]\n")
    optimized = Stack.from_recipe(load_recipe(str(composed)))
    assert Path(optimized.sampler.schedule_params["path"]) == (
        EMBEDDED_WEIGHTS_DIR / "flux-digits" / "schedules" / "unipc_bh2-nfe6.json")
    assert [p.name for p in tmp_path.iterdir()] == ["optimized.yaml"]  # loading wrote nothing


def test_embedded_names_resolve_inside_the_package_and_other_paths_relative_to_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_file("embedded:adapters/step-4") == EMBEDDED_WEIGHTS_DIR / "adapters" / "step-4"
    assert embedded_name("adapters/router/router.safetensors") == "embedded:adapters/router/router.safetensors"
    (tmp_path / "mine.json").write_text("{}")
    assert resolve_data_file("mine.json") == Path("mine.json")
    with pytest.raises(DataFileError) as missing:
        resolve_data_file("embedded:flux-digits/schedules/euler-nfe99.json", key="sampler.schedule_params.path",
                          what="optimised schedule", how="make it with `accel bench samplers`")
    message = str(missing.value)
    assert message == ("sampler.schedule_params.path: optimised schedule not found: embedded:flux-digits/schedules/"
                       f"euler-nfe99.json ({EMBEDDED_WEIGHTS_DIR / 'flux-digits/schedules/euler-nfe99.json'}); "
                       "make it with `accel bench samplers`")
    with pytest.raises(DataFileError, match="^adapters.0..path: file not found: nothere.safetensors$"):
        resolve_data_file("nothere.safetensors", key="adapters[0].path")
    with pytest.raises(DataFileError, match="leaves the shipped weights folder"):
        resolve_data_file("embedded:../recipes/embedded-demo.yaml")


def test_recipes_name_shipped_adapters_and_routers_with_the_scheme(tmp_path, monkeypatch):
    from accel.adapter_files import adapter_file, read_trained_for
    from accel.recipe import RecipeError

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("embedded-demo", ["sampler.solver=euler", "sampler.steps=4",
                                           'adapters=[{path: "embedded:adapters/step-4", fuse: true}]'])
    stack = Stack.from_recipe(recipe)
    assert adapter_file(stack.adapters[0].path) == (
        EMBEDDED_WEIGHTS_DIR / "adapters" / "step-4" / "pytorch_lora_weights.safetensors")
    assert read_trained_for(stack.adapters[0].path)["steps"] == "4"
    routed = Stack.from_recipe(load_recipe("embedded-demo", [
        "sampler.solver=euler", "sampler.steps=50", "cache.preset=router",
        'cache.params={path: "embedded:adapters/router/router.safetensors"}']))
    assert Path(routed.cache.params["path"]) == EMBEDDED_WEIGHTS_DIR / "adapters" / "router" / "router.safetensors"
    with pytest.raises(RecipeError, match="^adapters.0..path: file not found: embedded:adapters/nope "):
        load_recipe("embedded-demo", ['adapters=[{path: "embedded:adapters/nope"}]'])


def test_recipes_path_prints_the_installed_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "path", "launch/accelerate-cpu-2proc"]) == 0
    assert capsys.readouterr().out == f"{RECIPES_DIR / 'launch' / 'accelerate-cpu-2proc.yaml'}\n"
    assert main(["recipes", "path", "embedded-demo.yaml"]) == 0
    assert capsys.readouterr().out == f"{RECIPES_DIR / 'embedded-demo.yaml'}\n"
    for bad in ("nope", "../cli.py"):
        assert main(["recipes", "path", bad]) == 2
        assert capsys.readouterr().err.strip() == (
            f"accel: error: no shipped recipe {bad!r}; names as `accel recipes list` prints them "
            "(e.g. embedded-demo, launch/accelerate-cpu-2proc)")
