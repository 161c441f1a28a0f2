"""`step-distill`, `cache-aware` and `router` on any diffusers pipeline: recipe params -> an Objective.

The recipe's `model` section names the pipeline (an embedded name, a local pipeline folder or a
cached hub id); `objective.params` give the teacher (prompts, steps, solver, guidance: see
accel.training.teacher), the student (steps, solver, schedule, loss: distill's TrajectoryConfig)
and the adapter (rank, targets, cache). The student is the pipeline's own denoiser with a peft
LoRA on `lora_targets` (default: the Linear layers of every block's attention and feed-forward
children, read off the model by caching's layouts), run through the replayed pipeline denoiser with
the student's guidance; a cache-aware student trains with the recipe's cache installed through the
same resolver `accel.apply` uses. The adapter is exported in diffusers' LoRA format with what it was
trained for in its header (solver, steps, schedule, cache, guidance, uncond interval and the base
model's weights identity), which the resolver enforces (`adapter-trained-for`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

import caching
from accel.training.params import checked
from accel.training.teacher import PreparedPipeline, TeacherSettings, prepare_pipeline
from accel.training.trace import CallSettings
from distill.lora import add_lora, save_lora
from distill.objectives.router import RouterConfig, RouterLogits, RouterObjective
from distill.objectives.trajectory import TrajectoryConfig, TrajectoryDistillation

LORA_FILE = "pytorch_lora_weights.safetensors"
ROUTER_FILE = "router.safetensors"

TEACHER_DEFAULTS: dict[str, Any] = {
    "prompts": [], "prompt_file": None, "negative_prompt": None, "resolution": None, "frames": None,
    "call_kwargs": {}, "teacher_count": 512, "teacher_steps": 50, "teacher_solver": "euler", "guidance": 4.0,
    "teacher_batch": 64, "trace_batch": 8, "trajectories": "runs/teacher-trajectories"}
LORA_DEFAULTS: dict[str, Any] = {
    "rank": 16, "lora_alpha": None, "lora_targets": None, "gradient_checkpointing": False, "cache": None,
    "cache_params": {}, "student_guidance": 1.0, "student_uncond_interval": 1}
ROUTER_DEFAULTS: dict[str, Any] = {"threshold": 0.5}
MOVED = {"model": "model.name", "device": "model.device"}  # keys of earlier recipes, now in the model section


def _error(message: str):
    from accel.recipe.load import RecipeError

    return RecipeError(message)


def split_params(params: Mapping[str, Any], extra: dict[str, Any], config_type: type, what: str,
                 **config_defaults: Any) -> tuple[dict, Any]:
    """(teacher / adapter settings with defaults, the config_type built from its fields) from
    recipe params; unknown keys are refused with the allowed ones."""
    allowed = {**TEACHER_DEFAULTS, **extra}
    config_keys = {f.name for f in fields(config_type)}
    for key, where in MOVED.items():
        if key in params:
            raise _error(f"objective.params.{key}: set {where} instead (the recipe's model section)")
    unknown = sorted(set(params) - set(allowed) - config_keys)
    if unknown:
        raise _error(f"objective.params.{unknown[0]}: not a parameter of {what}; allowed: "
                     f"{', '.join(sorted(set(allowed) | config_keys))}")
    settings = {**allowed, **{k: v for k, v in params.items() if k in allowed}}
    given = {k: v for k, v in params.items() if k in config_keys}
    config = checked(lambda: config_type(**{**config_defaults, **given}))
    return settings, config


def _prompts(settings: dict[str, Any]) -> tuple[str, ...]:
    prompts = [str(p) for p in settings["prompts"] or []]
    if settings["prompt_file"]:
        path = Path(str(settings["prompt_file"]))
        if not path.is_file():
            raise _error(f"objective.params.prompt_file: no file at {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise _error("objective.params.prompts: give the teacher's prompts (prompts: [...] or prompt_file: PATH, "
                     "one a line; for the embedded digit model prompts naming a digit, e.g. 'digit 3')")
    return tuple(prompts)


def _positive_int(settings: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _error(f"objective.params.{key}: {value!r} must be an integer >= {minimum}")
    return value


def _guidance(settings: dict[str, Any], key: str) -> float:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise _error(f"objective.params.{key}: {value!r} must be a number >= 1 (1: no CFG)")
    return float(value)


def teacher_and_call(settings: dict[str, Any], student_guidance: float = 1.0) -> tuple[TeacherSettings, CallSettings]:
    """The teacher's settings and how the pipeline is called (with CFG when the teacher or the
    student guides, so the uncond rows are traced), from checked params."""
    guidance = _guidance(settings, "guidance")
    resolution = settings["resolution"]
    if resolution is None or (isinstance(resolution, int) and not isinstance(resolution, bool)):
        height = width = resolution
    elif isinstance(resolution, (list, tuple)) and len(resolution) == 2 and all(isinstance(v, int) for v in resolution):
        height, width = resolution
    else:
        raise _error(f"objective.params.resolution: {resolution!r}; give an int or [height, width]")
    teacher = TeacherSettings(
        prompts=_prompts(settings), count=_positive_int(settings, "teacher_count"),
        steps=_positive_int(settings, "teacher_steps", 2), solver=str(settings["teacher_solver"]),
        guidance=float(guidance), batch_size=_positive_int(settings, "teacher_batch"),
        folder=str(settings["trajectories"]), trace_batch=_positive_int(settings, "trace_batch"))
    call = CallSettings(height=height, width=width, frames=settings["frames"],
                        negative_prompt=settings["negative_prompt"], call_kwargs=dict(settings["call_kwargs"] or {}),
                        guidance=guidance if guidance > 1 else student_guidance)
    return teacher, call


def install_stack_cache(pipe: Any, module: Any, config: TrajectoryConfig, preset: str, params: dict[str, Any],
                        guidance: float = 1.0, uncond_interval: int = 1) -> Callable[[], None]:
    """Installs the cache on `module` exactly as `accel.apply` will for the student's stack (solver,
    steps, schedule, cache, guidance; the resolver's rules included); returns its remover."""
    from accel.pipeline import run_info_for
    from accel.resolve import resolve
    from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

    plan = GuidancePlan(1.0, True) if guidance == 1.0 else GuidancePlan(guidance, False, uncond_interval)
    stack = Stack(SamplerPlan(config.solver, config.steps, config.schedule), CachePlan(preset, params), (), plan)
    cache = resolve(stack, run_info_for(pipe, stack)).cache_config()
    if cache.trigger.needs_calibration:
        raise ValueError(f"cache-aware training with cache.preset={preset}: its trigger calibrates on the model, "
                         "which the adapter changes while training; use a preset without calibration "
                         "(fora, taylorseer, foca, dbcache, fbcache, toca, deltadit)")
    caching.apply_cache(module, cache)
    return lambda: caching.remove_cache(module)


def _frozen(prepared: PreparedPipeline) -> Any:
    import torch

    for component in prepared.model.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    return prepared.model.denoiser


def build_trajectory_objective(name: str, prepared: PreparedPipeline, *, config: TrajectoryConfig, rank: int,
                               alpha: float | None = None, targets: list[str] | None = None, cache: str | None = None,
                               cache_params: dict[str, Any] | None = None, guidance: float = 1.0,
                               uncond_interval: int = 1,
                               gradient_checkpointing: bool = False) -> TrajectoryDistillation:
    """A step-distillation ("step-distill") or cache-aware ("cache-aware") LoRA objective.

    Args:
        name: the method name recorded in the adapter.
        prepared: the pipeline with its teacher; `prepared.walks[0]` is the student's walk.
        config: student steps, solver, schedule, loss.
        rank, alpha, targets: the LoRA (targets None: `distill.lora.lora_targets`).
        cache: a cache preset the student trains (and must later run) under, or None.
        cache_params: the preset's parameters.
        guidance: the student's CFG scale: 1 distils guidance too (one cond pass a step); > 1 keeps
            CFG with the adapter on both branches (the untrained student is the plain solver).
        uncond_interval: > 1 trains with CFG's uncond branch computed every this many steps, as
            `guidance.uncond_interval` runs it; recorded, so the resolver then requires it.
        gradient_checkpointing: diffusers' `enable_gradient_checkpointing()` on the denoiser.
    """
    if uncond_interval > 1 and guidance == 1.0:
        raise ValueError("objective.params.student_uncond_interval > 1 needs CFG in the student "
                         "(student_guidance > 1): a guidance-distilled student has no uncond branch to reuse")
    module = _frozen(prepared)
    if gradient_checkpointing:
        if cache is not None:
            raise ValueError("objective.params.gradient_checkpointing with a cache: the checkpointed blocks would run "
                             "their cache hooks again in the backward pass; train cache-aware without it")
        module.enable_gradient_checkpointing()
    add_lora(module, rank=rank, alpha=alpha, targets=targets)
    metadata = {"accel.solver": config.solver, "accel.steps": str(config.steps), "accel.cache": cache or "none",
                "accel.method": name, "accel.guidance": "distilled" if guidance == 1.0 else f"{guidance:g}",
                "accel.schedule": config.schedule, "accel.base_model": prepared.base_identity,
                "accel.pipeline": type(prepared.model.pipe).__name__}
    if uncond_interval > 1:
        metadata["accel.uncond_interval"] = str(uncond_interval)
    install = None
    if cache is not None:
        params = dict(cache_params or {})
        install = lambda: install_stack_cache(prepared.model.pipe, module, config, cache, params,  # noqa: E731
                                              guidance, uncond_interval)
        metadata["accel.cache_params"] = json.dumps(params, sort_keys=True)
    component = prepared.model.denoiser_name

    def export(out_dir: Path) -> Path:
        return save_lora(module, Path(out_dir) / LORA_FILE, component=component, metadata=metadata)

    return TrajectoryDistillation(name, module, prepared.denoiser.denoiser(guidance, uncond_interval), prepared.teacher,
                                  config, export=export, install_cache=install, sigmas=prepared.walks[0].sigmas)


def build_router_objective(prepared: PreparedPipeline, *, config: RouterConfig, guidance: float,
                           threshold: float = 0.5) -> RouterObjective:
    """A learned router for the teacher's own solver and step count (a transformer's blocks only)."""
    module = _frozen(prepared)
    num_steps = prepared.teacher.x0.shape[1]
    blocks = caching.router_block_names(module)
    logits = RouterLogits(num_steps, len(blocks), config.init_logit, config.temperature)
    caching.apply_router(module, logits.gates, mode="soft")
    metadata = {"accel.solver": prepared.teacher.meta.get("solver", "euler"), "accel.steps": str(num_steps),
                "accel.cache": "router", "model_class": type(module).__name__, "num_blocks": str(len(blocks)),
                "threshold": str(threshold), "accel.base_model": prepared.base_identity}

    def export(out_dir: Path) -> Path:
        caching.remove_cache(module)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return caching.save_router(Path(out_dir) / ROUTER_FILE, logits.gates().detach().cpu(), metadata)

    return RouterObjective(logits, prepared.denoiser.denoiser(guidance), prepared.teacher, config, export)


def lora_objective_from_params(name: str, params: Mapping[str, Any], seed: int, model: Any) -> TrajectoryDistillation:
    """"step-distill" / "cache-aware" from recipe params and the recipe's model section."""
    settings, config = split_params(params, LORA_DEFAULTS, TrajectoryConfig, name, seed=seed, schedule="auto")
    if name == "cache-aware" and not settings["cache"]:
        raise _error("objective.params.cache: a cache-aware adapter needs the cache preset it trains under "
                     "(e.g. cache: fora, cache_params: {interval: 2})")
    guidance = _guidance(settings, "student_guidance")
    teacher, call = teacher_and_call(settings, guidance)
    rank = _positive_int(settings, "rank")
    prepared = prepare_pipeline(model, teacher, call, [(config.steps, config.schedule)])
    targets = settings["lora_targets"]
    return build_trajectory_objective(
        name, prepared, config=config, rank=rank, alpha=settings["lora_alpha"],
        targets=None if targets is None else [str(t) for t in targets], cache=settings["cache"],
        cache_params=dict(settings["cache_params"] or {}), guidance=guidance,
        uncond_interval=int(settings["student_uncond_interval"]),
        gradient_checkpointing=bool(settings["gradient_checkpointing"]))


def router_objective_from_params(params: Mapping[str, Any], seed: int, model: Any) -> RouterObjective:
    """"router" from recipe params (teacher fields, RouterConfig fields and the export threshold)."""
    settings, config = split_params(params, ROUTER_DEFAULTS, RouterConfig, "router", seed=seed)
    teacher, call = teacher_and_call(settings)
    prepared = prepare_pipeline(model, teacher, call)
    return build_router_objective(prepared, config=config, guidance=teacher.guidance,
                                  threshold=float(settings["threshold"]))
