"""Value checks the type system cannot express; each failure is one RecipeError line."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

import samplers
from accel.data_files import DataFileError, resolve_data_file
from accel.recipe.load import RecipeError

DTYPES = ("float32", "bfloat16", "float16")
METRICS = ("psnr", "ssim", "fd", "accuracy")
EMBEDDED_MODELS = ("flux-digits",)


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise RecipeError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise RecipeError(f"{key}: {value} must be >= {low}")


def _data_file(key: str, name, what: str, how: str = "") -> str:
    """A walk, adapter or router file the recipe names ("embedded:..." or a path), as a path string."""
    try:
        return str(resolve_data_file(str(name), key=key, what=what, how=how))
    except DataFileError as error:
        raise RecipeError(str(error)) from None


def is_hub_id(name: str) -> bool:
    """'owner/name' that is not a local path: a model to load in the user's own pipeline."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def model_family(model: DictConfig) -> str | None:
    """The noise family of the recipe's model when the project knows it (the embedded models)."""
    return None if is_hub_id(model.name) else "flow"


def _check_model(model: DictConfig) -> None:
    if model.name not in EMBEDDED_MODELS and not Path(model.name).is_dir() and not is_hub_id(model.name):
        raise RecipeError(f"model.name: {model.name!r} is neither an embedded model "
                          f"({', '.join(EMBEDDED_MODELS)}), a local folder nor a hub id 'owner/name'")
    _choice("model.dtype", model.dtype, DTYPES)
    if not (model.device == "cpu" or model.device.startswith("cuda")):
        raise RecipeError(f"model.device: {model.device!r}; use cpu, cuda or cuda:N")


def _check_sampling(prefix: str, section: DictConfig, family: str | None) -> None:
    _choice(f"{prefix}.solver", section.solver, sorted(samplers.SOLVERS))
    _choice(f"{prefix}.schedule", section.schedule, sorted(samplers.SCHEDULES))
    _at_least(f"{prefix}.steps", section.steps, 1)
    if family is None:  # a hub model: the resolver checks the fit against the real pipeline
        return
    params = dict(section.schedule_params)
    if section.schedule == "optimized" and params.get("path"):
        params["path"] = _data_file(f"{prefix}.schedule_params.path", params["path"], "optimised schedule",
                                    "make it with `accel bench samplers` or samplers.optimized.optimize_schedule")
    try:
        samplers.get_solver(section.solver).check_fits("flow", "flow")
        samplers.make_sigmas(section.schedule, section.steps, samplers.FlowSchedule(), **params)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{prefix}: {error}".splitlines()[0]) from None


def _check_inputs(inputs: DictConfig) -> None:
    if len(inputs.classes) == 0:
        raise RecipeError("inputs.classes: give at least one class")
    for label in inputs.classes:
        _choice("inputs.classes[]", label, list(range(10)))
    _at_least("inputs.samples_per_class", inputs.samples_per_class, 1)
    _at_least("inputs.batch_size", inputs.batch_size, 1)
    if inputs.resolution != 16:
        raise RecipeError(f"inputs.resolution: {inputs.resolution}; the embedded model is trained at 16")


def _check_eval(evaluation: DictConfig, family: str | None) -> None:
    _check_sampling("eval.reference", evaluation.reference, family)
    for metric in evaluation.metrics:
        _choice("eval.metrics[]", metric, METRICS)
    _at_least("eval.real_samples", evaluation.real_samples, 2)
    _at_least("eval.timing_batch", evaluation.timing_batch, 1)
    _at_least("eval.timing_repeats", evaluation.timing_repeats, 1)


def _check_adapters(adapters) -> None:
    for index, adapter in enumerate(adapters):
        _data_file(f"adapters[{index}].path", adapter.path, "file",
                   "give a .safetensors file or a folder holding one (made by `accel train`)")


def _check_cache(cache: DictConfig) -> None:
    if cache.preset is None:
        return
    import caching
    from omegaconf import OmegaConf

    _choice("cache.preset", cache.preset, caching.list_presets())
    params = OmegaConf.to_container(cache.params)
    if cache.preset == "router" and params.get("path"):
        params["path"] = _data_file("cache.params.path", params["path"], "router file",
                                    "train one with `accel train train/router`")
    try:
        caching.get_preset(cache.preset, **params)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"cache.params: {error}".splitlines()[0]) from None


GUIDANCE_AXES = ("guidance.uncond_interval", "guidance.distilled", "guidance.scale")


def _check_ablation(ablation: DictConfig, reference_guidance) -> None:
    from omegaconf import ListConfig

    for key, values in ablation.axes.items():
        if not isinstance(values, ListConfig) or len(values) == 0:
            raise RecipeError(f"ablation.axes.{key}: give a non-empty list of values")
        if key == "guidance.scale" and reference_guidance is None:
            raise RecipeError("ablation.axes.guidance.scale: the reference would change with it; set "
                              "eval.reference.guidance_scale so every cell shares one reference")
        if key.split(".")[0] in ("guidance", "inputs", "eval", "output", "model", "ablation", "name") \
                and key not in GUIDANCE_AXES:
            raise RecipeError(f"ablation.axes.{key}: only sampler, cache, adapters and "
                              f"{', '.join(GUIDANCE_AXES)} may vary (the reference and inputs are shared by every cell)")
    for solver in ablation.baseline_solvers:
        _choice("ablation.baseline_solvers[]", solver, sorted(samplers.SOLVERS))
    for steps in ablation.baseline_steps:
        _at_least("ablation.baseline_steps[]", steps, 1)
    _at_least("ablation.grid_rows", ablation.grid_rows, 1)


def validate_recipe(recipe: DictConfig) -> None:
    """Raises RecipeError for the first value outside what the project supports."""
    if not recipe.name or "/" in recipe.name:
        raise RecipeError(f"name: {recipe.name!r} must be a non-empty name without '/'")
    _check_model(recipe.model)
    family = model_family(recipe.model)
    _check_sampling("sampler", recipe.sampler, family)
    _check_inputs(recipe.inputs)
    _check_eval(recipe.eval, family)
    _check_adapters(recipe.adapters)
    if recipe.guidance.scale < 1.0:
        raise RecipeError(f"guidance.scale: {recipe.guidance.scale} must be >= 1 (1 disables CFG)")
    _at_least("guidance.uncond_interval", recipe.guidance.uncond_interval, 1)
    if recipe.guidance.distilled and recipe.guidance.scale != 1.0:
        raise RecipeError("guidance.scale: a guidance-distilled model has no uncond pass; set guidance.scale=1")
    _check_cache(recipe.cache)
    _check_ablation(recipe.ablation, recipe.eval.reference.get("guidance_scale"))
