"""`accel.apply(pipe, stack)` puts a Stack on any diffusers pipeline; `accel.remove(pipe)` takes it off.

apply, in this order:
  1. resolves the stack for the pipeline's denoiser (`pipe.transformer`, else `pipe.unet`) and
     the stack's step count (`accel.resolve`), before touching anything;
  2. loads the adapters with `pipe.load_lora_weights`, sets their scales and fuses them if asked,
     keeping a CPU copy of every weight fusing changes (unfusing is not bitwise exact);
  3. installs the cache with `caching.apply_cache` *after* fusing, so a trigger that calibrates
     on its first generation (TeaCache, MagCache) measures the adapted model;
  4. installs one hook on the denoiser that marks the guidance branch of every call: the name a
     pipeline gives it with `model.cache_context("cond" | "uncond")`, or "batched" where the
     pipeline concatenates cond and uncond (and, if asked, reuses the uncond branch);
  5. swaps `pipe.scheduler` for an `AccelScheduler` built from the old scheduler's config.

The AccelScheduler publishes the step context of every model call and starts a new generation
in each `set_timesteps`, which pipelines call once per `__call__`, so cache state resets per call.

Instance state: everything apply changed is kept in one `Applied` record in the module registry
`_APPLIED` (a WeakKeyDictionary keyed by the pipeline); nothing is stored on the pipeline and no
class is patched. `remove` undoes the steps in reverse order and restores the pipeline exactly:
the same scheduler object, the original weights, no hooks, no LoRA attributes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

import caching
from caching.hooks import InstalledHook, install_hook, uninstall_hooks
from samplers.diffusers_scheduler import AccelScheduler
from step_context import current_step, guidance_branch

from accel.adapter_files import check_adapter_file
from accel.resolve import ResolvedStack, RunInfo, resolve
from accel.stack import Stack, StackError

logger = logging.getLogger("accel")

# Attributes that loading / fusing LoRA adds to a pipeline or a model; removed if absent before.
LORA_ATTRIBUTES = ("_merged_adapters", "_hf_peft_config_loaded", "_safe_fusing", "lora_scale", "peft_config")
ADAPTER_PREFIX = "accel_"


@dataclass
class Applied:
    """Everything `apply` changed on one pipeline, so that `remove` can undo it exactly.

    Attributes:
        resolved: the resolved stack.
        denoiser: the denoiser the cache and the branch hook sit on.
        scheduler: the pipeline's own scheduler, put back by remove.
        adapter_names: the adapters loaded (named accel_0, accel_1, ...).
        lora_components: pipeline components LoRA was fused into.
        saved_weights: (parameter, CPU copy of its value before fusing).
        cache: the installed cache, or None.
        branch_hook: the guidance-branch hook, or None.
        installed: hooks to uninstall.
        attributes: (object, its attribute names before apply) for the pipeline and its models.
        had_forward: whether the denoiser had an instance `forward` before apply.
    """

    resolved: ResolvedStack
    denoiser: torch.nn.Module
    scheduler: Any
    adapter_names: list[str] = field(default_factory=list)
    lora_components: list[str] = field(default_factory=list)
    saved_weights: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    cache: caching.CacheHandle | None = None
    branch_hook: "GuidanceBranchHook | None" = None
    installed: list[InstalledHook] = field(default_factory=list)
    attributes: list[tuple[Any, set[str]]] = field(default_factory=list)
    had_forward: bool = False


_APPLIED: "weakref.WeakKeyDictionary[Any, Applied]" = weakref.WeakKeyDictionary()


class _PipelineCallName(StateManager):
    """Receives the name a diffusers pipeline gives a denoiser call (`model.cache_context(name)`)."""

    def __init__(self) -> None:
        super().__init__(dict)

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _with_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, (tuple, list)):
        return (tensor, *output[1:])
    return type(output)(**{**output, "sample": tensor})


class GuidanceBranchHook(ModelHook):
    """Marks each denoiser call with its guidance branch; optionally reuses the uncond branch.

    The branch is the name the pipeline gives the call ("cond" / "uncond"), or "batched" when the
    pipeline batches both branches into one call and guidance is on. With `uncond_interval` k > 1,
    the uncond branch is computed at steps 0, k, 2k, ... and elsewhere returns this step's cond
    output plus the latest computed (uncond - cond).

    Args:
        pipe: the pipeline (held weakly), for its `do_classifier_free_guidance`.
        batched: whether the pipeline batches cond and uncond.
        guidance_on: whether the stack assumes CFG (used when the pipeline does not say).
        uncond_interval: compute the uncond branch every this many steps.
        num_steps: the step count the stack was resolved for.
    """

    _is_stateful = True

    def __init__(self, pipe: Any, *, batched: bool, guidance_on: bool, uncond_interval: int,
                 num_steps: int) -> None:
        super().__init__()
        self.call_name = _PipelineCallName()
        self._pipe = weakref.ref(pipe)
        self.batched, self.guidance_on = batched, guidance_on
        self.uncond_interval, self.num_steps = uncond_interval, num_steps
        self.reused_calls = 0
        self._cond: tuple[tuple, Any] | None = None  # ((generation, step, stage), cond output)
        self._delta: tuple[int, torch.Tensor] | None = None  # (generation, uncond - cond)
        self._warned = False

    def branch(self) -> str | None:
        """The guidance branch of the call in progress (None: leave the default, "cond")."""
        name = self.call_name.name
        if name in ("cond", "uncond"):
            return name
        if self.batched and self._guidance_active():
            return "batched"
        return None

    def _guidance_active(self) -> bool:
        pipe = self._pipe()
        if pipe is not None and isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            with contextlib.suppress(AttributeError, TypeError):
                return bool(pipe.do_classifier_free_guidance)
        return self.guidance_on

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        branch, context = self.branch(), current_step()
        if context is not None and context.num_steps != self.num_steps and not self._warned:
            self._warned = True
            logger.warning("the stack was resolved for %d steps but the pipeline runs %d; pass "
                           "num_inference_steps=%d or apply the stack again", self.num_steps,
                           context.num_steps, self.num_steps)
        with guidance_branch(branch) if branch is not None else contextlib.nullcontext():
            if branch == "uncond" and self.uncond_interval > 1 and context is not None:
                return self._uncond(context, args, kwargs)
            output = self.fn_ref.original_forward(*args, **kwargs)
        if branch == "cond" and self.uncond_interval > 1 and context is not None:
            self._cond = ((context.generation, context.step_index, context.stage), output)
        return output

    def _uncond(self, context: Any, args: tuple, kwargs: dict) -> Any:
        key = (context.generation, context.step_index, context.stage)
        cond = self._cond[1] if self._cond is not None and self._cond[0] == key else None
        delta = self._delta[1] if self._delta is not None and self._delta[0] == context.generation else None
        if cond is not None and delta is not None and context.step_index % self.uncond_interval != 0:
            self.reused_calls += 1
            return _with_first_tensor(cond, _first_tensor(cond) + delta)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if cond is not None:
            self._delta = (context.generation, _first_tensor(output) - _first_tensor(cond))
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._cond = self._delta = None
        return module


# ---------------------------------------------------------------------------------------- run info


def _denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    for name in ("transformer", "unet"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return name, model
    raise StackError(f"{type(pipe).__name__} has neither a transformer nor a unet; accel.apply needs a "
                     "diffusers pipeline with one of them")


@functools.lru_cache(maxsize=None)
def _separate_branches(pipeline_class: type) -> bool:
    """Whether the pipeline calls its denoiser once per guidance branch (it names the calls)."""
    try:
        source = inspect.getsource(pipeline_class.__call__)
    except (OSError, TypeError):
        return False
    return 'cache_context("uncond"' in source or "cache_context('uncond'" in source


def _scheduler_config(pipe: Any) -> dict[str, Any]:
    """The pipeline scheduler's config, limited to what AccelScheduler reads (no noise about the rest)."""
    accepted = set(inspect.signature(AccelScheduler.__init__).parameters)
    return {k: v for k, v in pipe.scheduler.config.items() if k in accepted or k == "_class_name"}


def run_info_for(pipe: Any, stack: Stack) -> RunInfo:
    """What `stack` is resolved against on `pipe`: its denoiser, prediction type and guidance calls."""
    _, denoiser = _denoiser(pipe)
    try:
        probe = AccelScheduler.from_config(_scheduler_config(pipe), solver="euler", schedule="auto")
    except ValueError as error:
        raise StackError(f"{type(pipe).__name__}'s scheduler: {str(error).splitlines()[0]}") from None
    try:
        layout = caching.get_model_layout(denoiser)
        kind = layout.kind
        num_blocks = (len(caching.layouts.transformer_blocks(denoiser, layout)) if kind == "transformer"
                      else None)
    except ValueError:
        kind, num_blocks = "other", None
    guidance = stack.guidance
    mode = ("none" if not guidance.has_uncond_pass else
            "separate" if _separate_branches(type(pipe)) else "batched")
    return RunInfo(model_class=type(denoiser).__name__, model_kind=kind, prediction_type=probe.prediction,
                   num_steps=stack.sampler.steps, guidance=mode, num_blocks=num_blocks,
                   noise_family=probe.model_schedule.name, pipeline_class=type(pipe).__name__,
                   supports_lora=hasattr(pipe, "load_lora_weights"))


# ---------------------------------------------------------------------------------------- apply


def _as_stack(stack_or_recipe: Any) -> Stack:
    if isinstance(stack_or_recipe, Stack):
        return stack_or_recipe
    if hasattr(stack_or_recipe, "sampler") and hasattr(stack_or_recipe, "cache"):
        from omegaconf import OmegaConf
        recipe = stack_or_recipe
        if not OmegaConf.is_config(recipe):
            recipe = OmegaConf.structured(recipe)
        return Stack.from_recipe(recipe)
    raise StackError(f"accel.apply needs a Stack or a recipe, got {type(stack_or_recipe).__name__}")


def _new_scheduler(pipe: Any, stack: Stack) -> AccelScheduler:
    sampler = stack.sampler
    return AccelScheduler.from_config(_scheduler_config(pipe), solver=sampler.solver, schedule=sampler.schedule,
                                      schedule_options=dict(sampler.schedule_params) or None,
                                      solver_options=dict(sampler.solver_params) or None)


def _lora_components(pipe: Any) -> list[str]:
    return [name for name in getattr(pipe, "_lora_loadable_modules", ())
            if isinstance(getattr(pipe, name, None), torch.nn.Module)]


def _load_adapters(pipe: Any, record: Applied) -> None:
    """Loads the adapters, sets their scales and fuses them if asked (saving the weights first)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = record.resolved.stack.adapters
    for index, adapter in enumerate(adapters):
        file = check_adapter_file(adapter.path)
        name = f"{ADAPTER_PREFIX}{index}"
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        record.adapter_names.append(name)
    pipe.set_adapters(record.adapter_names, adapter_weights=[a.scale for a in adapters])
    if not adapters[0].fuse:
        return
    record.lora_components = _lora_components(pipe)
    for component in record.lora_components:
        for module in getattr(pipe, component).modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                for param in (base.weight, getattr(base, "bias", None)):
                    if param is not None:
                        record.saved_weights.append((param, param.detach().to("cpu", copy=True)))
    pipe.fuse_lora(components=record.lora_components, adapter_names=record.adapter_names)


def _install_branch_hook(pipe: Any, record: Applied) -> None:
    stack, run = record.resolved.stack, record.resolved.run
    hook = GuidanceBranchHook(pipe, batched=run.guidance == "batched", guidance_on=stack.guidance.has_uncond_pass,
                              uncond_interval=stack.guidance.uncond_interval, num_steps=run.num_steps)
    record.installed.append(install_hook(record.denoiser, hook, "stack-branches"))
    record.branch_hook = hook
    registry = getattr(record.denoiser, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def apply(pipe: Any, stack_or_recipe: Any) -> ResolvedStack:
    """Applies a stack (or a recipe naming one) to a diffusers pipeline.

    Args:
        pipe: a diffusers pipeline with a `transformer` or a `unet`.
        stack_or_recipe: a Stack, or a recipe (accel.recipe schema) to build one from.

    Returns:
        The resolved stack; print `.describe()`, save `.to_dict()` beside results.

    Raises:
        StackError: the stack cannot work on this pipeline (nothing is changed then), or the
            pipeline already has a stack or LoRA adapters.
    """
    if pipe in _APPLIED:
        raise StackError(f"{type(pipe).__name__} already has a stack applied; call accel.remove(pipe) first")
    stack = _as_stack(stack_or_recipe)
    resolved = resolve(stack, run_info_for(pipe, stack))
    _, denoiser = _denoiser(pipe)
    if resolved.stack.adapters and getattr(denoiser, "peft_config", None):
        raise StackError(f"{type(pipe).__name__} already has LoRA adapters {sorted(denoiser.peft_config)}; unload "
                         "them (pipe.unload_lora_weights()) or list them in the stack's adapters")
    scheduler = _new_scheduler(pipe, resolved.stack)
    objects = [pipe, *(getattr(pipe, name) for name in _lora_components(pipe)), denoiser]
    record = Applied(resolved, denoiser, pipe.scheduler, attributes=[(o, set(vars(o))) for o in objects],
                     had_forward="forward" in vars(denoiser))
    try:
        if resolved.stack.adapters:
            _load_adapters(pipe, record)
        config = resolved.cache_config()
        if config is not None:
            record.cache = caching.apply_cache(denoiser, config)
        if config is not None or resolved.stack.guidance.uncond_interval > 1:
            _install_branch_hook(pipe, record)
        pipe.scheduler = scheduler
    except Exception:
        _undo(pipe, record)
        raise
    _APPLIED[pipe] = record
    logger.info("applied stack to %s:\n%s", type(pipe).__name__, resolved.describe())
    return resolved


def _undo(pipe: Any, record: Applied) -> None:
    """Reverses apply's steps in reverse order (also after a partial apply)."""
    uninstall_hooks(record.installed)
    if record.cache is not None:
        caching.remove_cache(record.denoiser)
    if record.lora_components:
        pipe.unfuse_lora(components=record.lora_components)
    if record.adapter_names:
        pipe.unload_lora_weights()
    with torch.no_grad():
        for param, value in record.saved_weights:
            param.copy_(value.to(param.device))
    for obj, before in record.attributes:
        for name in LORA_ATTRIBUTES:
            if name not in before:
                vars(obj).pop(name, None)
    registry = getattr(record.denoiser, "_diffusers_hook", None)
    if not record.had_forward and (registry is None or not registry.hooks):
        vars(record.denoiser).pop("forward", None)
    if pipe.scheduler is not record.scheduler:
        pipe.scheduler = record.scheduler


def remove(pipe: Any) -> None:
    """Removes the stack applied to `pipe`, restoring scheduler, weights and hooks exactly."""
    record = _APPLIED.pop(pipe, None)
    if record is None:
        logger.warning("%s has no stack applied; nothing to remove", type(pipe).__name__)
        return
    _undo(pipe, record)


def applied(pipe: Any) -> Applied | None:
    """The record of the stack applied to `pipe` (resolved stack, cache handle, hook), or None."""
    return _APPLIED.get(pipe)
