"""Classifier-free guidance (Ho & Salimans 2022) as a model-function wrapper.

The cond and uncond branches are evaluated as two calls, each marked with its branch in the step
context, so that caches keep separate state per branch. With `uncond_interval` k > 1 the uncond
branch is computed only on steps 0, k, 2k, ... of a generation; in between it is estimated as this
step's cond output plus the latest computed (uncond - cond), the guidance-offset reuse of
FasterCache (Lv et al. 2024, arXiv:2410.19355) in its simplest form.
"""

from __future__ import annotations

from typing import Callable

import torch

from step_context import current_step, guidance_branch


def cfg_model_fn(model_fn: Callable[..., torch.Tensor], scale: float, *, cond_key: str,
                 uncond_value, uncond_interval: int = 1) -> Callable[..., torch.Tensor]:
    """Returns `fn(x, sigma, **cond) = uncond + scale * (cond - uncond)` on the raw prediction.

    Args:
        model_fn: the raw model function `model_fn(x, sigma, **cond)`.
        scale: guidance scale; 1 evaluates the cond branch only (no uncond pass).
        cond_key: the keyword of `cond` that carries the condition (e.g. "labels").
        uncond_value: `uncond_value(cond_tensor)` builds the null condition for the uncond branch.
        uncond_interval: compute the uncond branch every this many solver steps (1: always); needs
            a loop that publishes the step context (without one, every step computes it).
    """
    if isinstance(uncond_interval, bool) or not isinstance(uncond_interval, int) or uncond_interval < 1:
        raise ValueError(f"uncond_interval must be an integer >= 1, got {uncond_interval!r}")
    offsets: dict[tuple, torch.Tensor] = {}  # (generation, stage) -> latest uncond - cond

    def guided(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        with guidance_branch("cond"):
            conditional = model_fn(x, sigma, **cond)
        if scale == 1.0:
            return conditional
        context = current_step() if uncond_interval > 1 else None
        key = None if context is None else (context.generation, context.stage)
        is_reuse_step = key in offsets and context.step_index % uncond_interval != 0
        if is_reuse_step:
            return conditional + (1.0 - scale) * offsets[key]
        null_cond = dict(cond)
        null_cond[cond_key] = uncond_value(cond[cond_key])
        with guidance_branch("uncond"):
            unconditional = model_fn(x, sigma, **null_cond)
        if key is not None:
            if any(stored[0] != key[0] for stored in offsets):  # a new generation: drop the old one's
                offsets.clear()
            offsets[key] = unconditional - conditional
        return unconditional + scale * (conditional - unconditional)

    return guided
