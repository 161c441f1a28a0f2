"""Classifier-free guidance (Ho & Salimans 2022) as a model-function wrapper.

The cond and uncond branches are evaluated as two calls, each marked with its branch in the step
context, so that caches keep separate state per branch.
"""

from __future__ import annotations

from typing import Callable

import torch

from step_context import guidance_branch


def cfg_model_fn(model_fn: Callable[..., torch.Tensor], scale: float, *, cond_key: str,
                 uncond_value) -> Callable[..., torch.Tensor]:
    """Returns `fn(x, sigma, **cond) = uncond + scale * (cond - uncond)` on the raw prediction.

    Args:
        model_fn: the raw model function `model_fn(x, sigma, **cond)`.
        scale: guidance scale; 1 evaluates the cond branch only (no uncond pass).
        cond_key: the keyword of `cond` that carries the condition (e.g. "labels").
        uncond_value: `uncond_value(cond_tensor)` builds the null condition for the uncond branch.
    """
    def guided(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        with guidance_branch("cond"):
            conditional = model_fn(x, sigma, **cond)
        if scale == 1.0:
            return conditional
        null_cond = dict(cond)
        null_cond[cond_key] = uncond_value(cond[cond_key])
        with guidance_branch("uncond"):
            unconditional = model_fn(x, sigma, **null_cond)
        return unconditional + scale * (conditional - unconditional)

    return guided
