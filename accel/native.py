"""The native path: a resolved Stack on the embedded model, through the same Stack object as
`accel.apply` uses for diffusers pipelines."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from omegaconf import DictConfig

import caching
from accel.generate import SamplingPlan, generate, sample_noise
from accel.adapter_files import check_adapter_fits
from accel.resolve import ResolvedStack, RunInfo, resolve
from accel.stack import Stack

CALIBRATION_SEED_OFFSET = 7_777_777  # calibration noise never overlaps the measured seeds


def run_info_for(model, stack: Stack) -> RunInfo:
    """What the resolver needs to know about the embedded flow model for this stack."""
    transformer = model.transformer
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    guidance = "none" if stack.guidance.scale == 1.0 else "separate"
    return RunInfo(model_class=type(transformer).__name__, model_kind="transformer", prediction_type="flow",
                   num_steps=stack.sampler.steps, guidance=guidance, num_blocks=blocks)


def resolve_recipe(recipe: DictConfig, model) -> ResolvedStack:
    """The recipe's stack, resolved for the embedded model (raises StackError if it cannot work)."""
    stack = Stack.from_recipe(recipe)
    return resolve(stack, run_info_for(model, stack))


def plan_of(resolved: ResolvedStack) -> SamplingPlan:
    sampler = resolved.stack.sampler
    return SamplingPlan(solver=sampler.solver, steps=sampler.steps, schedule=sampler.schedule,
                        schedule_params=dict(sampler.schedule_params), solver_params=dict(sampler.solver_params))


@contextlib.contextmanager
def installed_adapters(model, resolved: ResolvedStack) -> Iterator[list[str]]:
    """Loads the stack's LoRA adapters into the transformer (diffusers' `load_lora_adapter`, the
    file's `transformer.` keys), sets their scales, fuses them if asked; unloads them on exit, so
    the base weights are exactly restored (fused weights from a copy kept before fusing). Yields
    the adapter names."""
    adapters = resolved.stack.adapters
    transformer = model.transformer
    names = [f"accel_{index}" for index in range(len(adapters))]
    if not adapters:
        yield names
        return
    original = {k: v.detach().clone() for k, v in transformer.state_dict().items()} if adapters[0].fuse else None
    try:
        for name, adapter in zip(names, adapters):
            file = check_adapter_fits(transformer, adapter.path, "transformer")
            transformer.load_lora_adapter(str(file), prefix="transformer", adapter_name=name)
        transformer.set_adapters(names, weights=[adapter.scale for adapter in adapters])
        if adapters[0].fuse:
            transformer.fuse_lora(adapter_names=names)
        yield names
    finally:
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        if original is not None:
            transformer.load_state_dict(original)


@contextlib.contextmanager
def installed_cache(model, resolved: ResolvedStack, denoiser, recipe: DictConfig) -> Iterator[object]:
    """Applies the stack's cache to the transformer for the block, calibrating it first if its
    trigger needs calibration (one full generation on calibration seeds, never the measured ones).
    Yields the cache handle (None without a cache); removes the cache on exit."""
    config = resolved.cache_config()
    if config is None:
        yield None
        return
    handle = caching.apply_cache(model.transformer, config)
    try:
        if config.trigger.needs_calibration:
            count = min(len(recipe.inputs.classes) * 2, recipe.inputs.batch_size)
            labels = torch.tensor(list(recipe.inputs.classes)).repeat(2)[:count]
            side = recipe.inputs.resolution
            noise = sample_noise(recipe.inputs.seed + CALIBRATION_SEED_OFFSET, range(count), (1, side, side))
            generate(denoiser, plan_of(resolved), noise, labels, count, device=recipe.model.device or "cpu")
        yield handle
    finally:
        caching.remove_cache(model.transformer)
