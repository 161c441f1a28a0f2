"""`accel.apply(pipe, stack)` puts a Stack on any diffusers pipeline; `accel.remove(pipe)` takes it off.

apply, in this order:
  1. reads the stack (a Stack, a recipe, a shipped recipe name or a YAML path), checks the recipe's
     model dtype and applies its device (`accel.placement`);
  2. resolves the stack for the pipeline's denoiser and the stack's step count (`accel.resolve`),
     before touching anything;
  3. loads the adapters with `pipe.load_lora_weights`, sets their scales and fuses them if asked
     (`accel.pipeline_lora`, which keeps what removal needs to restore the weights exactly);
  4. installs the cache with `caching.apply_cache` on every denoiser (`transformer`, Wan 2.2's
     `transformer_2`, or `unet`) *after* fusing, so a trigger that calibrates on its first
     generation (TeaCache, MagCache) measures the adapted model;
  5. installs one hook per denoiser that marks the guidance branch of every call
     (`accel.branch_hook`);
  6. swaps `pipe.scheduler` for an `AccelScheduler` built from the old scheduler's config.

Every pipeline call starts with `scheduler.set_timesteps`, which starts a new generation (cache
state resets per call) and tells the stack the call's step count: a call with another step count,
or with guidance switched on or off, is resolved again with the same rules (and refused the same
way, at call time). Resolutions and calibrated caches are kept per (steps, guidance), so a
calibration is only ever reused for the run it was made for.

Instance state: everything apply changed is kept in one `Applied` record in the module registry
`_APPLIED` (a WeakKeyDictionary keyed by the pipeline); nothing is stored on the pipeline and no
class is patched. `remove` undoes the steps in reverse order and restores the pipeline exactly: the
same scheduler object (unless the user set another one since), the original weights and device,
no hooks, no LoRA attributes (unless the user loaded adapters of their own since).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

import caching
from caching.hooks import InstalledHook, install_hook, uninstall_hooks
from samplers.diffusers_scheduler import AccelScheduler

from accel.adapter_files import check_adapter_fits
from accel.branch_hook import GuidanceBranchHook, branch_mode, guidance_active
from accel.pipeline_lora import LoadedAdapters, check_removable, load_adapters, unload_adapters
from accel.pipeline_info import pipeline_denoisers, run_info_for, scheduler_config  # noqa: F401 (run_info_for: API)
from accel.placement import place_pipeline, stack_and_placement
from accel.resolve import ResolvedStack, RunInfo, resolve
from accel.stack import Stack, StackError
from accel.stack_summary import StackSummary, summarize

logger = logging.getLogger("accel")

RunKey = tuple[int, str]  # (solver steps, guidance mode) of a pipeline call


@dataclass
class Applied:
    """Everything `apply` changed on one pipeline, so that `remove` can undo it exactly.

    Attributes:
        stack: the stack as given (its step count is the default call's).
        resolved: the stack resolved for the latest call (or for the default call before any).
        denoisers: (attribute name, module) of every denoiser the stack acts on (the original
            module of a `torch.compile` wrapper).
        scheduler: the pipeline's own scheduler, put back by remove.
        accel_scheduler: the AccelScheduler apply installed.
        base_run: what the stack was first resolved against (the per-call runs vary its steps
            and guidance mode).
        mode: how the pipeline evaluates guidance branches (`accel.branch_hook.branch_mode`).
        key: the (steps, guidance mode) the installed cache was resolved for.
        resolutions: every resolution made, by run key.
        calibrated: cache configs after a self-calibrating trigger calibrated, by run key.
        adapters: what loading the adapters changed.
        caches: denoiser name -> the installed cache.
        branch_hooks: the guidance-branch hook of each denoiser.
        installed: the branch hooks to uninstall.
        had_forward: denoiser name -> whether it had an instance `forward` before apply.
        moved_from: the device the pipeline was on before apply moved it, or None.
    """

    stack: Stack
    resolved: ResolvedStack
    denoisers: list[tuple[str, torch.nn.Module]]
    scheduler: Any
    accel_scheduler: AccelScheduler
    base_run: RunInfo
    mode: str
    key: RunKey
    resolutions: dict[RunKey, ResolvedStack] = field(default_factory=dict)
    calibrated: dict[RunKey, dict[str, caching.CacheConfig]] = field(default_factory=dict)
    adapters: LoadedAdapters = field(default_factory=LoadedAdapters)
    caches: dict[str, caching.CacheHandle] = field(default_factory=dict)
    branch_hooks: list[GuidanceBranchHook] = field(default_factory=list)
    installed: list[InstalledHook] = field(default_factory=list)
    had_forward: dict[str, bool] = field(default_factory=dict)
    moved_from: torch.device | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The primary denoiser (`transformer` or `unet`)."""
        return self.denoisers[0][1]

    @property
    def cache(self) -> caching.CacheHandle | None:
        """The primary denoiser's cache, or None."""
        return self.caches.get(self.denoisers[0][0])

    @property
    def branch_hook(self) -> GuidanceBranchHook | None:
        """The primary denoiser's branch hook."""
        return self.branch_hooks[0] if self.branch_hooks else None


_APPLIED: "weakref.WeakKeyDictionary[Any, Applied]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------- apply


def _new_scheduler(pipe: Any, stack: Stack) -> AccelScheduler:
    sampler = stack.sampler
    try:
        scheduler = AccelScheduler.from_config(scheduler_config(pipe), solver=sampler.solver,
                                               schedule=sampler.schedule,
                                               schedule_options=dict(sampler.schedule_params) or None,
                                               solver_options=dict(sampler.solver_params) or None)
    except ValueError as error:
        raise StackError(f"{type(pipe).__name__}'s scheduler: {str(error).splitlines()[0]}") from None
    logger.info("%s: %s walks %s", type(pipe).__name__, sampler.solver, scheduler.describe())
    return scheduler


# ---------------------------------------------------------------------------------------- per call


def _resolve_call(record: Applied, steps: int, mode: str) -> ResolvedStack:
    """The stack resolved for a call of `steps` steps with guidance `mode` (kept per run key)."""
    key = (steps, mode)
    if key in record.resolutions:
        return record.resolutions[key]
    stack = record.stack
    if steps != stack.sampler.steps:
        stack = stack.replace(sampler=dataclasses.replace(stack.sampler, steps=steps))
    try:
        resolved = resolve(stack, dataclasses.replace(record.base_run, num_steps=steps, guidance=mode))
    except StackError as error:
        raise StackError(f"pipeline call with num_inference_steps={steps} (guidance {mode}): {error}") from None
    if steps != record.stack.sampler.steps:
        line = (f"call-steps: this call runs {steps} steps, the stack names {record.stack.sampler.steps} -> "
                f"resolved for {steps}")
        resolved = dataclasses.replace(resolved, decisions=(line, *resolved.decisions))
    record.resolutions[key] = resolved
    return resolved


def _install_caches(record: Applied, resolved: ResolvedStack) -> None:
    """Installs the resolved cache on every denoiser (a config calibrated for this run if any)."""
    config = resolved.cache_config()
    if config is None:
        return
    calibrated = record.calibrated.get(record.key, {})
    for name, model in record.denoisers:
        record.caches[name] = caching.apply_cache(model, calibrated.get(name, config))


def _remove_caches(record: Applied) -> None:
    """Removes the caches; a trigger that calibrated itself keeps its config for its run key."""
    for name, model in record.denoisers:
        handle = record.caches.pop(name, None)
        if handle is None:
            continue
        config = record.resolved.cache_config()
        calibrator = handle.runtime.calibrator
        if calibrator is not None and calibrator.has_data:  # a calibrating call ended: fit it now
            with contextlib.suppress(ValueError):  # too little recorded: the next run calibrates again
                handle.runtime.finish_calibration()
        if config is not None and config.trigger.needs_calibration and not handle.config.trigger.needs_calibration:
            record.calibrated.setdefault(record.key, {})[name] = handle.config
        caching.remove_cache(model)


def _install_branch_hooks(pipe: Any, record: Applied) -> None:
    guidance = record.resolved.stack.guidance
    for _, model in record.denoisers:
        hook = GuidanceBranchHook(pipe, mode=record.mode, guidance_on=guidance.has_uncond_pass,
                                  uncond_interval=guidance.uncond_interval,
                                  on_uncond=functools.partial(_on_uncond, weakref.ref(pipe)))
        record.installed.append(install_hook(model, hook, "stack-branches"))
        record.branch_hooks.append(hook)
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


def _uninstall_branch_hooks(record: Applied) -> None:
    uninstall_hooks(record.installed)
    record.installed.clear()
    record.branch_hooks.clear()


def _switch(pipe: Any, record: Applied, steps: int, mode: str) -> None:
    """Makes the installed stack the one resolved for (steps, mode), reinstalling the cache if it differs."""
    if (steps, mode) == record.key:
        return
    resolved = _resolve_call(record, steps, mode)
    config = resolved.cache_config()
    calibrates = config is not None and config.trigger.needs_calibration  # a calibration fits one run only
    if resolved.stack.cache != record.resolved.stack.cache or calibrates:
        _uninstall_branch_hooks(record)
        _remove_caches(record)
        record.key, record.resolved = (steps, mode), resolved
        _install_caches(record, resolved)
        _install_branch_hooks(pipe, record)
    else:
        record.key, record.resolved = (steps, mode), resolved
    for hook in record.branch_hooks:
        hook.uncond_interval = resolved.stack.guidance.uncond_interval


def _call_mode(pipe: Any, record: Applied) -> str:
    """The guidance mode of the call about to run, as far as the pipeline says before it runs."""
    if not guidance_active(pipe, record.stack.guidance.has_uncond_pass):
        return "none"
    return "batched" if record.mode == "batched" else "separate"


def _on_new_call(pipe_ref: "weakref.ref", scheduler: AccelScheduler) -> None:
    """AccelScheduler.set_timesteps listener: resolves the stack for the call that starts."""
    pipe = pipe_ref()
    record = _APPLIED.get(pipe) if pipe is not None else None
    if record is None or scheduler is not record.accel_scheduler:
        return
    _switch(pipe, record, int(scheduler.num_inference_steps), _call_mode(pipe, record))


def _ignoring_full_branches(plan: Any) -> Any:
    if plan is None:
        return None
    return plan.preset, {k: v for k, v in plan.params.items() if k != "full_branches"}, plan.scope


def _on_uncond(pipe_ref: "weakref.ref") -> None:
    """Branch-hook callback: an uncond call is about to run. A pipeline that runs CFG without
    saying so beforehand (FLUX's true_cfg_scale) is resolved again, in place: only the cache's
    full branches and CFG reuse can change, and neither needs the hooks reinstalled."""
    pipe = pipe_ref()
    record = _APPLIED.get(pipe) if pipe is not None else None
    if record is None or record.key[1] == "separate":
        return
    resolved = _resolve_call(record, record.key[0], "separate")
    old, new = record.resolved.stack.cache, resolved.stack.cache
    if _ignoring_full_branches(old) != _ignoring_full_branches(new):
        raise StackError("this call runs classifier-free guidance the stack did not expect and its cache would "
                         "change; apply the stack with guidance.scale > 1 (or guidance.distilled=false)")
    branches = tuple(new.build().full_branches) if new is not None else ()
    for handle in record.caches.values():
        handle.config.full_branches = branches
    for hook in record.branch_hooks:
        hook.uncond_interval = resolved.stack.guidance.uncond_interval
    record.key, record.resolved = (record.key[0], "separate"), resolved


# ---------------------------------------------------------------------------------------- apply


def apply(pipe: Any, stack_or_recipe: Any) -> ResolvedStack:
    """Applies a stack (or a recipe naming one) to a diffusers pipeline.

    Args:
        pipe: a diffusers pipeline with a `transformer` or a `unet`.
        stack_or_recipe: a Stack, a recipe (accel.recipe schema), a shipped recipe name
            (e.g. "templates/flux-dev") or a recipe YAML path.

    Returns:
        The resolved stack; print `.describe()`, save `.to_dict()` beside results.

    Raises:
        StackError: the stack cannot work on this pipeline (nothing is changed then), or the
            pipeline already has a stack, or LoRA adapters while the stack brings its own.
        RecipeError: a recipe name or file that does not load.
        CalibrationError: the recipe's calibration file was made for another model or run.
    """
    if pipe in _APPLIED:
        raise StackError(f"{type(pipe).__name__} already has a stack applied; call accel.remove(pipe) first")
    stack, placement = stack_and_placement(stack_or_recipe, pipe)
    denoisers = pipeline_denoisers(pipe)
    base_run = run_info_for(pipe, stack)
    resolved = resolve(stack, base_run)
    primary_name, primary = denoisers[0]
    if resolved.stack.adapters and getattr(primary, "peft_config", None):
        raise StackError(f"{type(pipe).__name__} already has LoRA adapters {sorted(primary.peft_config)}; unload "
                         "them (pipe.unload_lora_weights()) or list them in the stack's adapters")
    for adapter in resolved.stack.adapters:  # whole, finite, and shaped for this denoiser: before any change
        check_adapter_fits(primary, adapter.path, primary_name)
    scheduler = _new_scheduler(pipe, resolved.stack)
    record = Applied(stack, resolved, denoisers, pipe.scheduler, scheduler, base_run,
                     mode=branch_mode(type(pipe)),
                     key=(resolved.run.num_steps, resolved.run.guidance), resolutions={},
                     had_forward={name: "forward" in vars(model) for name, model in denoisers})
    record.resolutions[record.key] = resolved
    try:
        record.moved_from = place_pipeline(pipe, primary, placement)
        if resolved.stack.adapters:
            load_adapters(pipe, resolved.stack.adapters, record.adapters)
        _install_caches(record, resolved)
        _install_branch_hooks(pipe, record)
        scheduler.generation_listeners.append(functools.partial(_on_new_call, weakref.ref(pipe)))
        pipe.scheduler = scheduler
    except Exception:
        _undo(pipe, record)
        raise
    _APPLIED[pipe] = record
    logger.info("applied stack to %s:\n%s", type(pipe).__name__, resolved.describe())
    return resolved


def _undo(pipe: Any, record: Applied) -> None:
    """Reverses apply's steps in reverse order (also after a partial apply)."""
    if pipe.scheduler is record.accel_scheduler:
        pipe.scheduler = record.scheduler
    elif pipe.scheduler is not record.scheduler:
        logger.info("accel.remove: left the scheduler set after apply (%s) in place",
                    type(pipe.scheduler).__name__)
    _uninstall_branch_hooks(record)
    _remove_caches(record)
    unload_adapters(pipe, record.adapters)
    for name, model in record.denoisers:
        registry = getattr(model, "_diffusers_hook", None)
        if not record.had_forward.get(name, False) and (registry is None or not registry.hooks):
            vars(model).pop("forward", None)
    if record.moved_from is not None:
        pipe.to(record.moved_from)


def remove(pipe: Any) -> None:
    """Removes the stack applied to `pipe`, restoring scheduler, weights, device and hooks exactly.

    Raises:
        StackError: the user loaded LoRA adapters after apply while the stack's adapters are fused
            (nothing is changed then; the message names what to delete first).
    """
    record = _APPLIED.get(pipe)
    if record is None:
        logger.warning("%s has no stack applied; nothing to remove", type(pipe).__name__)
        return
    check_removable(pipe, record.adapters)
    del _APPLIED[pipe]
    _undo(pipe, record)


def applied(pipe: Any) -> Applied | None:
    """The record of the stack applied to `pipe` (resolved stack, cache handles, hooks), or None."""
    return _APPLIED.get(pipe)


def summary(pipe: Any) -> StackSummary:
    """What the stack did in the pipeline's latest call (see accel.stack_summary.StackSummary).

    Raises:
        StackError: no stack is applied to `pipe`.
    """
    record = _APPLIED.get(pipe)
    if record is None:
        raise StackError(f"{type(pipe).__name__} has no stack applied; call accel.apply(pipe, ...) first")
    return summarize(type(pipe).__name__, record.resolved, dict(record.caches), list(record.branch_hooks))
