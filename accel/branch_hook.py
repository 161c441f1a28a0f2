"""The hook `accel.apply` puts on each denoiser: it marks guidance branches, reuses the uncond
branch when the stack asks, counts calls per branch and tells the stack which branches run.

How a pipeline evaluates guidance is read from its `__call__` (`branch_mode`):

* "named": each call is wrapped in `model.cache_context("cond" | "uncond")` (FLUX, Wan, QwenImage,
  HunyuanVideo, CogView4); the hook receives the name through a diffusers `StateManager`.
* "batched": cond and uncond are concatenated into one call (`torch.cat([latents] * 2)`: SD, SDXL,
  SD3, PixArt, Sana, LTX, CogVideoX ...); the call is "batched" while guidance is on.
* "ordered": separate calls without names (Chroma, Lumina2, FLUX Kontext): within a step the first
  call is "cond" and a second one "uncond".

The branch is published with `step_context.set_branch` (the blockless `guidance_branch`), so caches keep
one state per branch. The bookkeeping runs under `torch.compiler.disable`: a compiled denoiser traces
only its own forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import weakref
from collections import Counter
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

from step_context import current_step, reset_branch, set_branch


class PipelineCallName(StateManager):
    """Receives the name a diffusers pipeline gives a denoiser call (`model.cache_context(name)`)."""

    def __init__(self) -> None:
        super().__init__(dict)

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name


def first_tensor(output: Any) -> torch.Tensor:
    """The prediction of a denoiser output (a tuple, or a diffusers output with `.sample`)."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _with_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, (tuple, list)):
        return (tensor, *output[1:])
    return type(output)(**{**output, "sample": tensor})


@functools.lru_cache(maxsize=None)
def branch_mode(pipeline_class: type) -> str:
    """"named", "batched" or "ordered": how the pipeline's `__call__` evaluates guidance branches."""
    try:
        source = inspect.getsource(pipeline_class.__call__)
    except (OSError, TypeError):
        return "ordered"
    if re.search(r"cache_context\(\s*[\"']uncond[\"']", source):
        return "named"
    if re.search(r"torch\.cat\(\s*\[\s*(latents|latent_model_input|hidden_states)[^\]]*\]\s*\*\s*2", source) \
            or re.search(r"torch\.cat\(\s*\[\s*latents\s*,\s*latents\s*\]", source):
        return "batched"
    return "ordered"


def guidance_active(pipe: Any, assumed: bool) -> bool:
    """Whether a pipeline runs classifier-free guidance now: its `do_classifier_free_guidance`
    property where it has one, else what the stack assumes."""
    if pipe is not None and isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        with contextlib.suppress(AttributeError, TypeError):
            return bool(pipe.do_classifier_free_guidance)
    return assumed


class GuidanceBranchHook(ModelHook):
    """Marks each denoiser call with its guidance branch; optionally reuses the uncond branch.

    The branch is the name the pipeline gives the call ("cond" / "uncond"), or "batched" when the
    pipeline batches both branches into one call and guidance is on. With `uncond_interval` k > 1,
    the uncond branch is computed at steps 0, k, 2k, ... and elsewhere returns this step's cond
    output plus the latest computed (uncond - cond).

    Args:
        pipe: the pipeline (held weakly), for its `do_classifier_free_guidance`.
        mode: the pipeline's `branch_mode`.
        guidance_on: whether the stack assumes CFG (used when the pipeline does not say).
        uncond_interval: compute the uncond branch every this many steps.
        on_uncond: called once per generation, before the first uncond call runs (the stack
            learns that this call runs CFG, e.g. FLUX's `true_cfg_scale`).
    """

    _is_stateful = True

    def __init__(self, pipe: Any, *, mode: str, guidance_on: bool, uncond_interval: int,
                 on_uncond: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.call_name = PipelineCallName()
        self._pipe = weakref.ref(pipe)
        self.mode, self.guidance_on = mode, guidance_on
        self._step_calls: tuple[tuple, int] = ((), 0)  # ((generation, step, stage), calls so far) for "ordered"
        self.uncond_interval = uncond_interval
        self.on_uncond = on_uncond
        self.reused_calls = 0
        self.calls: Counter[str] = Counter()  # calls of the latest generation, per branch
        self._generation: int | None = None
        self._uncond_seen = False
        self._cond: tuple[tuple, Any] | None = None  # ((generation, step, stage), cond output)
        self._delta: tuple[int, torch.Tensor] | None = None  # (generation, uncond - cond)

    def branch(self, context: Any) -> str | None:
        """The guidance branch of the call in progress (None: leave the default, "cond")."""
        name = self.call_name.name
        if name in ("cond", "uncond"):
            return name
        if self.mode == "batched":
            return "batched" if guidance_active(self._pipe(), self.guidance_on) else None
        if self.mode == "ordered" and context is not None:
            key = (context.generation, context.step_index, context.stage)
            calls = self._step_calls[1] + 1 if self._step_calls[0] == key else 1
            self._step_calls = (key, calls)
            return "cond" if calls == 1 else "uncond"
        return None

    def _count(self, context: Any, branch: str | None) -> None:
        generation = None if context is None else context.generation
        if generation != self._generation:
            self._generation, self._uncond_seen = generation, False
            self.calls, self.reused_calls = Counter(), 0
        self.calls[branch or "cond"] += 1
        if branch == "uncond" and not self._uncond_seen:
            self._uncond_seen = True
            if self.on_uncond is not None:
                self.on_uncond()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        token, branch, context = self._enter()
        try:
            reuses = self.uncond_interval > 1 and context is not None
            output = self._reused_uncond(context) if reuses and branch == "uncond" else None
            if output is None:
                output = self.fn_ref.original_forward(*args, **kwargs)
                if reuses and branch in ("cond", "uncond"):
                    self._keep(context, branch, output)
        finally:
            if token is not None:
                reset_branch(token)
        return output

    @torch.compiler.disable
    def _enter(self) -> tuple[Any, str | None, Any]:
        """Reads the step context, names the call's branch, counts it and publishes it.

        Returns:
            (the token that unpublishes the branch, or None; the branch or None; the step context).
        """
        context = current_step()
        branch = self.branch(context)
        self._count(context, branch)
        return (set_branch(branch) if branch is not None else None), branch, context

    @torch.compiler.disable
    def _reused_uncond(self, context: Any) -> Any:
        """This step's cond output plus the latest (uncond - cond), or None when uncond must run."""
        key = (context.generation, context.step_index, context.stage)
        cond = self._cond[1] if self._cond is not None and self._cond[0] == key else None
        delta = self._delta[1] if self._delta is not None and self._delta[0] == context.generation else None
        if cond is not None and delta is not None and context.step_index % self.uncond_interval != 0:
            self.reused_calls += 1
            return _with_first_tensor(cond, first_tensor(cond) + delta)
        return None

    @torch.compiler.disable
    def _keep(self, context: Any, branch: str, output: Any) -> None:
        """Keeps a cond output for this step's uncond call; an uncond output updates the offset."""
        key = (context.generation, context.step_index, context.stage)
        if branch == "cond":
            self._cond = (key, output)
        elif self._cond is not None and self._cond[0] == key:
            self._delta = (context.generation, first_tensor(output) - first_tensor(self._cond[1]))

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._cond = self._delta = None
        return module
