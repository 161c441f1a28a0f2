"""The embedded flow model wired to distill/'s objectives: teacher trajectories, LoRA students,
the cache a cache-aware adapter trains under, and the learned router.

distill/ knows no model; this module supplies the embedded one. Every objective learns from the
same teacher: the evaluation reference (50-step Euler, uniform flow times, guidance 4) run on
training seeds that no measurement uses (`TRAIN_SEED`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

import caching
import samplers
from accel.embedded import FluxDigits
from accel.embedded.model import weights_fingerprint
from accel.generate import flux_digits_denoiser, sample_noise
from accel.resolve import resolve
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack
from distill.lora import add_lora, save_lora
from distill.objectives.router import RouterConfig, RouterLogits, RouterObjective
from distill.objectives.trajectory import TrajectoryConfig, TrajectoryDistillation
from distill.trajectories import Trajectories, record_trajectories

TRAIN_SEED = 1000  # measured runs use seeds 0 and 1; cache calibration uses seed + 7,777,777
LORA_FILE = "pytorch_lora_weights.safetensors"
ROUTER_FILE = "router.safetensors"


def teacher_trajectories(model: FluxDigits, folder: str | Path, *, count: int, steps: int = 50,
                         guidance: float = 4.0, seed: int = TRAIN_SEED, batch_size: int = 64,
                         resolution: int = 16, solver: str = "euler") -> Trajectories:
    """The guided teacher's states (`solver`, `steps` on the flow schedule) on `count` training
    seeds (labels cycle 0..9), resumable."""
    labels = torch.arange(count) % 10
    noise = sample_noise(seed, range(count), (1, resolution, resolution))
    sigmas = samplers.make_sigmas("flow", steps, samplers.FlowSchedule())
    meta = {"model": weights_fingerprint(model), "solver": solver, "steps": str(steps), "schedule": "flow",
            "guidance": f"{guidance:g}", "seed": str(seed), "batch_size": str(batch_size)}
    return record_trajectories(flux_digits_denoiser(model, guidance), noise, {"labels": labels},
                               solver=solver, sigmas=sigmas, batch_size=batch_size, folder=folder, meta=meta,
                               device=next(model.transformer.parameters()).device)


def install_stack_cache(model: FluxDigits, steps: int, solver: str, preset: str, params: dict[str, Any],
                        guidance: float = 1.0, uncond_interval: int = 1) -> Callable[[], None]:
    """Installs the cache exactly as `accel run` will for (solver, steps, preset, params) and the
    student's guidance (the resolver's rules included); returns its remover."""
    stack = Stack(SamplerPlan(solver, steps), CachePlan(preset, params), (),
                  GuidancePlan(1.0, True) if guidance == 1.0 else GuidancePlan(guidance, False, uncond_interval))
    from accel.native import run_info_for

    resolved = resolve(stack, run_info_for(model, stack))
    config = resolved.cache_config()
    if config.trigger.needs_calibration:
        raise ValueError(f"cache-aware training with cache.preset={preset}: its trigger calibrates on the model, "
                         "which the adapter changes while training; use a preset without calibration "
                         "(fora, taylorseer, foca, dbcache, fbcache, toca, deltadit)")
    caching.apply_cache(model.transformer, config)
    return lambda: caching.remove_cache(model.transformer)


def _lora_exporter(model: FluxDigits, metadata: dict[str, str]) -> Callable[[Path], Path]:
    def export(out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        return save_lora(model.transformer, out_dir / LORA_FILE, component="transformer", metadata=metadata)
    return export


def build_trajectory_objective(name: str, model: FluxDigits, teacher: Trajectories, *, rank: int,
                               config: TrajectoryConfig, cache: str | None = None,
                               cache_params: dict[str, Any] | None = None,
                               guidance: float = 1.0, uncond_interval: int = 1) -> TrajectoryDistillation:
    """A step-distillation ("step-distill") or cache-aware ("cache-aware") LoRA objective.

    Args:
        name: the method name recorded in the adapter.
        model: the embedded model; a LoRA of `rank` is added to its transformer (the rest frozen).
        teacher: recorded teacher trajectories.
        rank: LoRA rank.
        config: student steps, solver, schedule, loss.
        cache: a cache preset the student trains (and must later run) under, or None.
        cache_params: the preset's parameters.
        guidance: the student's CFG scale: 1 distils guidance too (one cond pass per step, the
            adapter starts far from the teacher); > 1 keeps CFG with the adapter on both branches
            (the untrained student is the plain solver, so training starts from the baseline).
        uncond_interval: > 1 trains with CFG's uncond branch computed every this many steps and
            (uncond - cond) reused in between (samplers.cfg_model_fn), as it will run; recorded in
            the adapter, so the resolver then requires guidance.uncond_interval to match.
    """
    if uncond_interval > 1 and guidance == 1.0:
        raise ValueError("objective.params.student_uncond_interval > 1 needs CFG in the student "
                         "(student_guidance > 1): a guidance-distilled student has no uncond branch to reuse")
    for module in (model.transformer, model.conditioner):
        module.requires_grad_(False)
    add_lora(model.transformer, rank=rank)
    metadata = {"accel.solver": config.solver, "accel.steps": str(config.steps), "accel.cache": cache or "none",
                "accel.method": name, "accel.guidance": "distilled" if guidance == 1.0 else f"{guidance:g}",
                "accel.schedule": config.schedule}
    if uncond_interval > 1:
        metadata["accel.uncond_interval"] = str(uncond_interval)
    install = None
    if cache is not None:
        params = dict(cache_params or {})
        install = lambda: install_stack_cache(model, config.steps, config.solver, cache, params,  # noqa: E731
                                              guidance, uncond_interval)
        metadata["accel.cache_params"] = json.dumps(params, sort_keys=True)
    return TrajectoryDistillation(name, model.transformer, flux_digits_denoiser(model, guidance, uncond_interval),
                                  teacher, config,
                                  export=_lora_exporter(model, metadata), install_cache=install)


def build_router_objective(model: FluxDigits, teacher: Trajectories, *, config: RouterConfig,
                           guidance: float = 4.0, threshold: float = 0.5) -> RouterObjective:
    """A learned router for the teacher's own solver and step count (the reference's)."""
    for module in (model.transformer, model.conditioner):
        module.requires_grad_(False)
    num_steps = teacher.x0.shape[1]
    blocks = caching.router_block_names(model.transformer)
    logits = RouterLogits(num_steps, len(blocks), config.init_logit, config.temperature)
    caching.apply_router(model.transformer, logits.gates, mode="soft")
    metadata = {"accel.solver": teacher.meta.get("solver", "euler"), "accel.steps": str(num_steps),
                "accel.cache": "router", "model_class": type(model.transformer).__name__,
                "num_blocks": str(len(blocks)), "threshold": str(threshold)}

    def export(out_dir: Path) -> Path:
        caching.remove_cache(model.transformer)
        out_dir.mkdir(parents=True, exist_ok=True)
        return caching.save_router(out_dir / ROUTER_FILE, logits.gates().detach().cpu(), metadata)

    return RouterObjective(logits, flux_digits_denoiser(model, guidance), teacher, config, export)



# ---- `accel train` builders: objective params from a training recipe -> an Objective ----------

TEACHER_DEFAULTS = {"model": "flux-digits", "device": "cpu", "teacher_count": 512, "teacher_steps": 50,
                    "teacher_solver": "euler",
                    "guidance": 4.0, "teacher_batch": 64, "trajectories": "runs/teacher-trajectories"}
LORA_DEFAULTS = {"rank": 16, "cache": None, "cache_params": {}, "student_guidance": 1.0,
                 "student_uncond_interval": 1}


def _split(params: Mapping[str, Any], extra: dict[str, Any], config_type: type, what: str) -> tuple[dict, dict]:
    """(teacher/LoRA settings, config_type kwargs) from recipe params; unknown keys are refused."""
    allowed = {**TEACHER_DEFAULTS, **extra}
    config_keys = {f.name for f in fields(config_type)}
    unknown = sorted(set(params) - set(allowed) - config_keys)
    if unknown:
        raise ValueError(f"objective.params.{unknown[0]}: not a parameter of {what}; allowed: "
                         f"{', '.join(sorted(set(allowed) | config_keys))}")
    settings = {**allowed, **{k: v for k, v in params.items() if k in allowed}}
    return settings, {k: v for k, v in params.items() if k in config_keys}


def _teacher(settings: dict[str, Any]) -> tuple[FluxDigits, Trajectories]:
    from accel.execute import load_embedded_model

    model = load_embedded_model(settings["model"], settings["device"])
    teacher = teacher_trajectories(model, settings["trajectories"], count=int(settings["teacher_count"]),
                                   steps=int(settings["teacher_steps"]), guidance=float(settings["guidance"]),
                                   batch_size=int(settings["teacher_batch"]), solver=str(settings["teacher_solver"]))
    return model, teacher


def lora_objective_from_params(name: str, params: Mapping[str, Any], seed: int) -> TrajectoryDistillation:
    """"step-distill" / "cache-aware" from recipe params (teacher, LoRA and TrajectoryConfig fields)."""
    settings, config = _split(params, LORA_DEFAULTS, TrajectoryConfig, name)
    if name == "cache-aware" and not settings["cache"]:
        raise ValueError("objective.params.cache: a cache-aware adapter needs the cache preset it trains under "
                         "(e.g. cache: fora, cache_params: {interval: 2})")
    model, teacher = _teacher(settings)
    return build_trajectory_objective(name, model, teacher, rank=int(settings["rank"]),
                                      config=TrajectoryConfig(**{"seed": seed, **config}), cache=settings["cache"],
                                      cache_params=dict(settings["cache_params"] or {}),
                                      guidance=float(settings["student_guidance"]),
                                      uncond_interval=int(settings["student_uncond_interval"]))


def router_objective_from_params(params: Mapping[str, Any], seed: int) -> RouterObjective:
    """"router" from recipe params (teacher fields, RouterConfig fields and the export threshold)."""
    settings, config = _split(params, {"threshold": 0.5}, RouterConfig, "router")
    model, teacher = _teacher(settings)
    return build_router_objective(model, teacher, config=RouterConfig(**{"seed": seed, **config}),
                                  guidance=float(settings["guidance"]), threshold=float(settings["threshold"]))
