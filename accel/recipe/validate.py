"""Value checks the type system cannot express; each failure is one RecipeError line.

Counts have upper bounds as well as lower ones, so a typo (`sampler.steps=1000000000`) is refused
instead of exhausting memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import samplers
from accel.calibration import CalibrationError, check_markers, is_marker, marker_budget
from accel.lab.inputs import CALIBRATION_SEED_OFFSET
from accel.recipe import content
from accel.data_files import DataFileError, resolve_data_file
from accel.recipe.load import RecipeError

DTYPES = ("float32", "bfloat16", "float16")
METRICS = ("psnr", "ssim", "lpips", "clip_score", "image_reward", "fd", "accuracy")
EMBEDDED_MODELS = ("flux-digits", "unet-digits")
MAX_STEPS = 1000  # solver steps of a run, a reference or a baseline
MAX_SAMPLES = 100_000  # generated samples of a run (classes x samples_per_class)
MAX_BATCH = 10_000  # samples per model call or timed call
MAX_REAL_SAMPLES = 100_000
MAX_REPEATS = 100
MAX_SEED = 2**32
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise RecipeError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _between(key: str, value, low, high) -> None:
    if value < low:
        raise RecipeError(f"{key}: {value} must be >= {low}")
    if value > high:
        raise RecipeError(f"{key}: {value} must be <= {high}")


def _data_file(key: str, name, what: str, how: str = "") -> str:
    """A walk, adapter or router file the recipe names ("embedded:..." or a path), as a path string."""
    try:
        return str(resolve_data_file(str(name), key=key, what=what, how=how))
    except DataFileError as error:
        raise RecipeError(str(error)) from None


def is_hub_id(name: str) -> bool:
    """'owner/name' that is not a local path: a model to load in the user's own pipeline."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


DIGIT_PIPELINES = ("FluxDigitsPipeline", "UNetDigitsPipeline")  # pipeline classes of the embedded digit models
EPSILON_DIGIT_MODELS = ("unet-digits", "UNetDigitsPipeline")  # the embedded VP (epsilon) model, by name or class


def is_embedded(model: DictConfig) -> bool:
    """Whether the recipe's model is a digit model (class labels, FD, accuracy): a shipped name, or a
    pipeline folder of the embedded models' class (e.g. one `scripts/train_embedded.py` wrote)."""
    return model.name in EMBEDDED_MODELS or _pipeline_class_name(model) in DIGIT_PIPELINES


def _pipeline_class_name(model: DictConfig) -> str | None:
    """The `_class_name` of the model folder's model_index.json, or None."""
    index = Path(str(model.name)) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (ValueError, OSError, AttributeError):
        return None


def model_family(model: DictConfig) -> str | None:
    """The noise family of the recipe's model when the project knows it before loading it (the
    embedded models); None for a user's pipeline, checked by the resolver against the real one."""
    if not is_embedded(model):
        return None
    vp = model.name in EPSILON_DIGIT_MODELS or _pipeline_class_name(model) in EPSILON_DIGIT_MODELS
    return "vp" if vp else "flow"


def _check_model(model: DictConfig) -> None:
    if model.name not in EMBEDDED_MODELS and not Path(model.name).is_dir() and not is_hub_id(model.name):
        raise RecipeError(f"model.name: {model.name!r} is neither an embedded model "
                          f"({', '.join(EMBEDDED_MODELS)}), a local folder nor a hub id 'owner/name'")
    if model.name not in EMBEDDED_MODELS and Path(model.name).is_dir():
        _check_model_folder(Path(model.name))
    if model.dtype is not None:
        _choice("model.dtype", model.dtype, DTYPES)
    if model.device is not None and not DEVICE.fullmatch(model.device):
        raise RecipeError(f"model.device: {model.device!r}; use cpu, cuda or cuda:N")


def _check_model_folder(folder: Path) -> None:
    """A local diffusers pipeline folder (model_index.json) with safetensors weights (never a pickle)."""
    if not (folder / "model_index.json").is_file():
        raise RecipeError(f"model.name: {str(folder)!r} has no model_index.json; give a folder written by "
                          "pipe.save_pretrained(...)")
    pickles = [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if pickles and not any(folder.rglob("*.safetensors")):
        raise RecipeError(f"model.name: {str(folder)!r} has only pickled weights ({pickles[0].name}), which are never "
                          "loaded; save them with save_pretrained(safe_serialization=True)")


def check_device_available(key: str, device: str) -> None:
    """`cpu`, or `cuda` / `cuda:N` where this torch has that CUDA device (checked where the project
    runs the model itself; a hub recipe may name a device of another machine)."""
    import torch

    if not DEVICE.fullmatch(device):
        raise RecipeError(f"{key}: {device!r}; use cpu, cuda or cuda:N")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise RecipeError(f"{key}: {device!r}, but this torch sees no CUDA device; use {key}=cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise RecipeError(f"{key}: {device!r}, but there are {torch.cuda.device_count()} CUDA devices")


def _check_sampling(prefix: str, section: DictConfig, family: str | None) -> None:
    _between(f"{prefix}.steps", section.steps, 1, MAX_STEPS)
    if section.solver is None:  # the reference on the pipeline's own scheduler
        return
    _choice(f"{prefix}.solver", section.solver, sorted(samplers.SOLVERS))
    _choice(f"{prefix}.schedule", section.schedule, ["auto", *sorted(samplers.SCHEDULES)])
    _check_solver_options(prefix, section.solver, OmegaConf.to_container(section.solver_params))
    if family is None or section.schedule == "auto":  # the resolver checks the fit against the real pipeline
        return
    params = dict(section.schedule_params)
    if is_marker(params.get("path")) or is_marker(section.solver_params.get("compensation")):
        return  # searched by `accel calibrate`; the searched walk is checked when the calibration loads
    if section.schedule == "optimized" and params.get("path"):
        params["path"] = _data_file(f"{prefix}.schedule_params.path", params["path"], "optimised schedule",
                                    "make it with `accel bench samplers` or samplers.optimized.optimize_schedule")
    prediction, noise_schedule = _known_model(family)
    try:
        samplers.get_solver(section.solver).check_fits(prediction, family)
        samplers.make_sigmas(section.schedule, section.steps, noise_schedule, **params)
        _dry_run(section, params, prediction, noise_schedule)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{prefix}: {error}".splitlines()[0]) from None


def _check_solver_options(prefix: str, solver: str, options: dict) -> None:
    """Refuses solver options the solver's core does not take (its own fixed ones included)."""
    import inspect

    spec = samplers.get_solver(solver)
    accepted = [name for name in list(inspect.signature(spec.steps).parameters)[3:] if name not in spec.options]
    unknown = sorted(set(options) - {*accepted, "compensation"})
    if unknown:
        raise RecipeError(f"{prefix}.solver_params: solver {solver!r} takes no option {', '.join(unknown)}; "
                          f"its options are: {', '.join([*accepted, 'compensation'])}")


def _known_model(family: str) -> tuple[str, object]:
    """(prediction type, noise schedule) of an embedded model family: flow velocity, or the UNet's
    epsilon on SD's scaled-linear betas."""
    if family == "vp":
        return "epsilon", samplers.vp_schedule_from_betas(1000, 0.00085, 0.012, "scaled_linear")
    return "flow", samplers.FlowSchedule()


def _dry_run(section: DictConfig, schedule_params: dict, prediction: str = "flow", noise_schedule=None) -> None:
    """Runs the sampler on a 2x2 zero model, so a bad option value fails here, not mid-run."""
    import torch

    denoiser = samplers.Denoiser(lambda x, sigma, **_: torch.zeros_like(x), prediction_type=prediction,
                                 schedule=noise_schedule or samplers.FlowSchedule())
    with torch.random.fork_rng(devices=[]):
        samplers.sample(denoiser, torch.zeros(1, 1, 2, 2), solver=section.solver, steps=section.steps,
                        schedule=section.schedule, schedule_options=schedule_params,
                        solver_options=OmegaConf.to_container(section.solver_params))


def _check_embedded_inputs(inputs: DictConfig) -> None:
    if len(inputs.classes) == 0:
        raise RecipeError("inputs.classes: give at least one class")
    for label in inputs.classes:
        _choice("inputs.classes[]", label, list(range(10)))
    _between("inputs.samples_per_class", inputs.samples_per_class, 1, MAX_SAMPLES)
    if len(inputs.classes) * inputs.samples_per_class > MAX_SAMPLES:
        raise RecipeError(f"inputs.samples_per_class: {inputs.samples_per_class} x {len(inputs.classes)} classes "
                          f"is more than {MAX_SAMPLES} samples")
    if inputs.resolution not in (None, 16):
        raise RecipeError(f"inputs.resolution: {inputs.resolution}; the embedded model is trained at 16")
    if inputs.prompts or inputs.prompt_file:
        raise RecipeError("inputs.prompts: the embedded digit model takes inputs.classes, not prompts")


def _check_prompt_inputs(inputs: DictConfig) -> None:
    prompts = len(inputs.prompts)
    if inputs.prompt_file is not None:
        path = Path(str(inputs.prompt_file))
        if not path.is_file():
            raise RecipeError(f"inputs.prompt_file: no file at {str(path)!r}")
        prompts += sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())
    if prompts == 0:
        raise RecipeError("inputs.prompts: a text pipeline needs prompts; give inputs.prompts=[...] or "
                          "inputs.prompt_file=PATH (one prompt a line)")
    _between("inputs.samples_per_prompt", inputs.samples_per_prompt, 1, MAX_SAMPLES)
    if prompts * inputs.samples_per_prompt > MAX_SAMPLES:
        raise RecipeError(f"inputs.samples_per_prompt: {inputs.samples_per_prompt} x {prompts} prompts is more than "
                          f"{MAX_SAMPLES} samples")
    resolution = inputs.resolution
    sides = [] if resolution is None else [resolution] if isinstance(resolution, int) else list(resolution)
    if resolution is not None and (len(sides) not in (1, 2) or not all(isinstance(v, int) for v in sides)):
        raise RecipeError(f"inputs.resolution: {resolution!r}; give an int or [height, width]")
    for side in sides:
        _between("inputs.resolution", side, 8, 16384)
    if inputs.frames is not None:
        _between("inputs.frames", inputs.frames, 1, 10_000)


def _check_inputs(inputs: DictConfig, embedded: bool) -> None:
    if embedded:
        _check_embedded_inputs(inputs)
    else:
        _check_prompt_inputs(inputs)
    _between("inputs.batch_size", inputs.batch_size, 1, MAX_BATCH)
    _between("inputs.seed", inputs.seed, 0, MAX_SEED)


def _check_eval(evaluation: DictConfig, family: str | None) -> None:
    _check_sampling("eval.reference", evaluation.reference, family)
    for metric in evaluation.metrics:
        _choice("eval.metrics[]", metric, METRICS)
    _between("eval.real_samples", evaluation.real_samples, 2, MAX_REAL_SAMPLES)
    _between("eval.timing_batch", evaluation.timing_batch, 1, MAX_BATCH)
    _between("eval.timing_repeats", evaluation.timing_repeats, 1, MAX_REPEATS)
    scale = evaluation.reference.get("guidance_scale")
    if scale is not None and scale < 1.0:
        raise RecipeError(f"eval.reference.guidance_scale: {scale} must be >= 1 (1 disables CFG) or null")


def _check_adapters(adapters) -> None:
    from accel.adapter_files import check_adapter_file
    from accel.stack import StackError

    for index, adapter in enumerate(adapters):
        _data_file(f"adapters[{index}].path", adapter.path, "file",
                   "give a .safetensors file or a folder holding one (made by `accel train`)")
        try:
            check_adapter_file(adapter.path)
        except StackError as error:
            raise RecipeError(f"adapters[{index}].path: {error}") from None


def _check_cache(cache: DictConfig) -> None:
    if cache.preset is None:
        return
    import caching
    from omegaconf import OmegaConf

    _choice("cache.preset", cache.preset, caching.list_presets())
    params = _without_markers(OmegaConf.to_container(cache.params))
    if cache.preset == "router" and params.get("path"):
        params["path"] = _data_file("cache.params.path", params["path"], "router file",
                                    "train one with `accel train train/router`")
    try:
        caching.get_preset(cache.preset, **params)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"cache.params: {error}".splitlines()[0]) from None


def _without_markers(params: dict) -> dict:
    """Cache parameters with `calibrated` markers set to what the preset accepts in their place: K
    evenly spaced computed steps for "calibrated K", the preset's default for the rest."""
    checked = {}
    for key, value in params.items():
        if not is_marker(value):
            checked[key] = value
        elif key == "steps" and marker_budget(f"cache.params.{key}", value):
            budget = marker_budget(f"cache.params.{key}", value)
            checked[key] = [i / budget for i in range(budget)]
    return checked


def _check_calibrate(recipe: DictConfig) -> None:
    section = recipe.calibrate
    _between("calibrate.samples", section.samples, 1, MAX_SAMPLES)
    _between("calibrate.seed", section.seed, 0, MAX_SEED)
    if section.prompt_file is not None and not Path(str(section.prompt_file)).is_file():
        raise RecipeError(f"calibrate.prompt_file: no file at {str(section.prompt_file)!r}")
    if recipe.inputs.seed == section.seed + CALIBRATION_SEED_OFFSET:
        raise RecipeError(f"inputs.seed: {recipe.inputs.seed} is the calibration seed (calibrate.seed + "
                          f"{CALIBRATION_SEED_OFFSET}); evaluate on other seeds")
    try:
        check_markers(recipe)
    except CalibrationError as error:
        raise RecipeError(str(error)) from None


GUIDANCE_AXES = ("guidance.uncond_interval", "guidance.distilled", "guidance.scale")


def _check_axis_key(key: str) -> None:
    """An axis names a recipe key: a schema field, or a key inside a free-form parameter mapping."""
    from accel.recipe.schema import Recipe

    node = OmegaConf.structured(Recipe)
    for depth, part in enumerate(key.split(".")):
        if isinstance(node, DictConfig) and node._metadata.object_type in (None, dict):
            return  # inside e.g. sampler.schedule_params: the sampler checks the cell's options
        if not isinstance(node, DictConfig) or part not in node:
            here = ".".join(key.split(".")[:depth]) or "the recipe"
            allowed = ", ".join(map(str, node.keys())) if isinstance(node, DictConfig) else "(none)"
            raise RecipeError(f"ablation.axes.{key}: no key {part!r} in {here}; keys there: {allowed}")
        node = node._get_node(part)


def _check_ablation(ablation: DictConfig, reference_guidance) -> None:
    from omegaconf import ListConfig

    for key, values in ablation.axes.items():
        _check_axis_key(str(key))
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
        _between("ablation.baseline_steps[]", steps, 1, MAX_STEPS)
    _between("ablation.grid_rows", ablation.grid_rows, 1, MAX_REPEATS)


def validate_recipe(recipe: DictConfig) -> None:
    """Raises RecipeError for the first value outside what the project supports."""
    content.check_path_component(recipe.name, "name")
    _check_model(recipe.model)
    family = model_family(recipe.model)
    _check_sampling("sampler", recipe.sampler, family)
    _check_inputs(recipe.inputs, is_embedded(recipe.model))
    _check_eval(recipe.eval, family)
    if not is_embedded(recipe.model) and any(m in ("fd", "accuracy") for m in recipe.eval.metrics):
        raise RecipeError("eval.metrics: fd and accuracy need the embedded digit models' judge; for your pipeline "
                          "use psnr, ssim, lpips, clip_score or image_reward")
    _check_adapters(recipe.adapters)
    if recipe.guidance.scale < 1.0:
        raise RecipeError(f"guidance.scale: {recipe.guidance.scale} must be >= 1 (1 disables CFG)")
    _between("guidance.uncond_interval", recipe.guidance.uncond_interval, 1, MAX_STEPS)
    if recipe.guidance.distilled and recipe.guidance.scale != 1.0:
        raise RecipeError("guidance.scale: a guidance-distilled model has no uncond pass; set guidance.scale=1")
    _check_calibrate(recipe)
    _check_cache(recipe.cache)
    _check_ablation(recipe.ablation, recipe.eval.reference.get("guidance_scale"))
