"""Recipe validation: every bad input is one line naming the key, and exit code 2."""

import pytest
from omegaconf import ListConfig, OmegaConf

from accel.cli import main
from accel.recipe import RecipeError, load_recipe


def test_default_recipe_loads_with_typed_fields():
    recipe = load_recipe()
    assert recipe.name == "embedded-demo"
    assert recipe.sampler.steps == 6 and recipe.eval.reference.steps == 50
    assert recipe.sampler.solver == "unipc_bh2" and recipe.cache.preset is None
    assert list(recipe.inputs.classes) == list(range(10))


def test_overrides_apply_last():
    recipe = load_recipe(None, ["sampler.steps=12", "guidance.scale=2.5", "inputs.classes=[1,2]"])
    assert recipe.sampler.steps == 12 and recipe.guidance.scale == 2.5
    assert list(recipe.inputs.classes) == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    (["sampler.stepz=3"], "unknown key 'sampler.stepz'; allowed keys here: solver, steps, schedule, schedule_params, solver_params"),
    (["sampler.steps=abc"], "wrong type for 'sampler.steps'"),
    (["sampler.solver=foo"], "sampler.solver: 'foo' is not allowed; choose one of: "),
    (["sampler.steps=0"], "sampler.steps: 0 must be >= 1"),
    (["model.dtype=float8"], "model.dtype: 'float8' is not allowed; choose one of: float32, bfloat16, float16"),
    (["inputs.classes=[3,11]"], "inputs.classes[]: 11 is not allowed"),
    (["eval.metrics=[psnr,fid]"], "eval.metrics[]: 'fid' is not allowed"),
    (["guidance.scale=0.5"], "guidance.scale: 0.5 must be >= 1"),
    (["adapters=[{path: /no/such.safetensors}]"], "adapters[0].path: file not found"),
    (["steps"], "override 'steps' is not of the form key=value"),
])
def test_bad_recipes_raise_one_line_errors(overrides, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_recipe_file_lists_shipped_recipes():
    with pytest.raises(RecipeError, match="recipe file not found: nope.yaml .shipped recipes: .*embedded-demo"):
        load_recipe("nope.yaml")


def test_cli_exits_2_with_one_line_on_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  solver: euler\n  colour: red\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "accel: error: unknown key 'sampler.colour'; allowed keys here: solver, steps, schedule, schedule_params, solver_params"
    assert main(["run", "sampler.steps=-1"]) == 2
    assert "sampler.steps: -1 must be >= 1" in capsys.readouterr().err


def _schema_keys(node, prefix=""):
    from omegaconf import DictConfig

    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig) and key != "params":
            yield from _schema_keys(value, path + ".")
        else:
            yield path


def test_every_schema_field_is_documented():
    from pathlib import Path

    from omegaconf import OmegaConf

    from accel.recipe.schema import AdapterConfig, Recipe

    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    keys = list(_schema_keys(OmegaConf.structured(Recipe)))
    keys += [f"adapters[].{k}" for k in OmegaConf.structured(AdapterConfig).keys()]
    missing = [k for k in keys if f"`{k}`" not in docs]
    assert len(keys) > 25 and missing == []


def test_defaults_compose_group_files_and_the_recipe_overrides_them(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("defaults: [model/flux-digits, sampler/euler-8]\nname: r\nsampler:\n  steps: 5\n")
    recipe = load_recipe(str(recipe_file))
    assert recipe.sampler.solver == "euler" and recipe.sampler.steps == 5 and recipe.name == "r"


def test_unknown_default_group_option_lists_the_options(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("defaults: [sampler/nope]\n")
    with pytest.raises(RecipeError, match=r"defaults: no sampler/nope.yaml; sampler options: .*euler-8"):
        load_recipe(str(recipe_file))


def test_every_shipped_recipe_starts_with_the_command_that_runs_it():
    from accel.recipe import RECIPES_DIR

    files = sorted(RECIPES_DIR.rglob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("accel " in first or "accel.apply" in first), path


def test_templates_load_as_stacks_and_accel_run_says_when_hub_weights_are_not_cached(capsys, tmp_path,
                                                                                       monkeypatch):
    from accel.stack import Stack

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty cache: nothing is downloaded
    for name in ("flux-dev", "sd35-large", "wan21-t2v-1.3b", "sdxl"):
        recipe = load_recipe(f"templates/{name}")
        stack = Stack.from_recipe(recipe)
        assert stack.cache is not None and stack.sampler.steps >= 20 and stack.sampler.schedule == "auto"
        assert len(recipe.inputs.prompts) >= 4 and recipe.eval.reference.solver is None
    assert main(["run", "templates/sdxl", "model.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a hub id that is not in the local Hugging Face cache" in err[0]
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0" in err[0]


def test_every_training_recipe_field_and_objective_param_is_documented():
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    from accel.recipe.train_schema import TrainRecipe
    from accel.training.objectives import LORA_DEFAULTS, ROUTER_DEFAULTS, TEACHER_DEFAULTS
    from accel.train import DDPMParams, FlowMatchingParams
    from distill.objectives.router import RouterConfig
    from distill.objectives.trajectory import TrajectoryConfig

    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    training = docs[docs.index("## Training recipes"):]
    keys = list(_schema_keys(OmegaConf.structured(TrainRecipe)))
    keys += sorted({f"objective.params.{f.name}" for p in (FlowMatchingParams, DDPMParams) for f in fields(p)})
    distill = {*TEACHER_DEFAULTS, *LORA_DEFAULTS, *ROUTER_DEFAULTS}
    distill |= {f.name for p in (TrajectoryConfig, RouterConfig) for f in fields(p)}
    keys += sorted(f"objective.params.{name}" for name in distill)
    missing = [k for k in keys if f"`{k}`" not in training]
    assert len(keys) > 60 and "objective.params.lora_targets" in keys and "model.name" in keys and missing == []


def test_recipes_show_resolves_training_recipes(capsys):
    from accel.cli import main

    assert main(["recipes", "show", "train/step-distill-4", "--resolved", "train.steps=5"]) == 0
    shown = capsys.readouterr().out
    assert "name: step-distill-4" in shown and "  steps: 5\n" in shown and "teacher_solver: unipc_bh2" in shown


@pytest.mark.parametrize("recipe", ["train/step-distill-4", "train/router", "train/flow-digits",
                                    "train/flux-dev-step-4", "train/wan21-t2v-cache-aware"])
def test_train_quick_is_a_three_step_smoke_run_in_its_own_folder(recipe):
    from accel.recipe.train_schema import load_train_recipe
    from accel.train import quick_overrides

    full = load_train_recipe(recipe)
    quick = load_train_recipe(recipe, [*quick_overrides(full), "train.seed=3"])
    assert quick.train.steps == 3 and quick.train.seed == 3 and quick.output.dir == "runs/train-quick"
    if full.objective.name in ("step-distill", "router", "cache-aware"):
        assert quick.objective.params.teacher_count == 16
        assert quick.objective.params.trajectories != full.objective.params.get("trajectories")
        assert quick.objective.params.get("teacher_steps", 8) <= 8
    resolution = full.objective.params.get("resolution")
    if isinstance(resolution, (list, ListConfig)):  # a pipeline template: its teacher at a small size
        assert list(quick.objective.params.resolution) == {"train/flux-dev-step-4": [256, 256],
                                                           "train/wan21-t2v-cache-aware": [144, 256]}[recipe]


def test_apply_takes_a_dict_of_recipe_sections_validated_like_a_file():
    from accel.placement import stack_and_placement
    from accel.recipe import RecipeError

    stack, _ = stack_and_placement({"sampler": {"solver": "dpmpp_2m", "steps": 7},
                                    "cache": {"preset": "fora", "params": {"interval": 2}}})
    assert (stack.sampler.solver, stack.sampler.steps, stack.cache.preset) == ("dpmpp_2m", 7, "fora")
    with pytest.raises(RecipeError, match="unknown key 'sampler.solverr'"):
        stack_and_placement({"sampler": {"solverr": "euler"}})
    with pytest.raises(RecipeError, match="guidance.scale: inf is not a finite number"):
        stack_and_placement(OmegaConf.create({"guidance": {"scale": float("inf")}}))


def test_calibrated_cache_recipe_resolves_to_its_placement_and_gains():
    import json

    import caching
    from accel.data_files import resolve_data_file
    from accel.stack import Stack

    recipe = load_recipe("embedded-calibrated-cache")
    shipped = json.loads(resolve_data_file(recipe.calibration).read_text())
    assert shipped["markers"] == {"cache.params.steps": "calibrated 6", "cache.params.gains": "calibrated"}
    stack = Stack.from_recipe(recipe)
    assert (stack.sampler.solver, stack.sampler.steps) == ("euler", 50)
    config = caching.get_preset(recipe.cache.preset, **OmegaConf.to_container(recipe.cache.params))
    assert config.update.gains == tuple(shipped["values"]["cache.params.gains"]) and config.update.order == 2
    assert config.trigger.steps == tuple(shipped["values"]["cache.params.steps"])
    assert len(config.trigger.steps) == 6 and len(config.update.gains) == 5
