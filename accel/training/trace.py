"""Tracing a diffusers pipeline: what it passes its denoiser, and the walk its scheduler takes.

A pipeline turns prompts into denoiser inputs (prompt embeddings, pooled embeddings, ids, masks,
guidance embeddings, ...) in code that differs per family. Rather than re-implement that per
family, `PipelineTracer` calls the pipeline itself with a hook on its denoiser that records the
keyword arguments of every denoiser call of the first step, per guidance branch, and answers with
zeros instead of running the denoiser; at the second step's first call the call is stopped. The
scheduler is an `AccelScheduler` on the walk asked for, so the step context says which noise level
and model timestep each call was made at. What comes out (`Conditioning`) is enough to call the
denoiser again at any latents and noise level without the pipeline, its text encoders or its VAE:

* per-prompt tensors (rows 0..P-1 for the cond branch, P..2P-1 for uncond when guidance ran);
  which arguments are per prompt is read from two probe calls of 1 and 2 prompts;
* tensors shared by every call (FLUX's `img_ids` / `txt_ids`) and non-tensor arguments;
* the relation of the `timestep` argument to the scheduler's model timestep (FLUX passes t,
  SD3 and Wan 1000 t: a constant ratio, checked on two steps), the name and per-sample shape of the
  latent argument (packed tokens for FLUX, 5-D for Wan) and how the branches are called
  (`accel.branch_hook.branch_mode`: named, ordered, or batched as [uncond, cond]).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook

from caching.discovery import forward_parameters
from caching.layouts import bind_arguments
from step_context import current_step

from accel.branch_hook import PipelineCallName

NEST = "/"  # joins a nested argument's keys: added_cond_kwargs/text_embeds


class TraceError(ValueError):
    """A pipeline whose denoiser calls cannot be replayed; one line naming the argument and the fix."""


class _Stop(Exception):
    """Ends a traced pipeline call once what is needed is recorded."""


@dataclass
class _Call:
    step: int
    name: str | None
    arguments: dict[str, Any]
    timestep: float


class _Recorder(ModelHook):
    """Records the bound arguments of each denoiser call until step `stop_step`; returns zeros."""

    _is_stateful = True

    def __init__(self, stop_step: int) -> None:
        super().__init__()
        self.call_name = PipelineCallName()
        self.stop_step = stop_step
        self.calls: list[_Call] = []

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        context = current_step()
        step = context.step_index if context is not None else 0
        if step >= self.stop_step:
            raise _Stop
        names = forward_parameters(type(module))
        given = bind_arguments(module, args, kwargs)
        bound = {name: given[name] for name in names if name in given}  # the latents first
        bound.update({k: v for k, v in given.items() if k not in bound})
        self.calls.append(_Call(step, self.call_name.name, bound, context.timestep if context else float("nan")))
        zeros = torch.zeros_like(bound[next(iter(bound))])
        return (zeros,) if bound.get("return_dict", True) is False else Transformer2DModelOutput(sample=zeros)


def _flatten(arguments: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in arguments.items():
        if isinstance(value, dict) and value and any(isinstance(v, torch.Tensor) for v in value.values()):
            flat.update(_flatten(value, f"{prefix}{key}{NEST}"))
        else:
            flat[prefix + key] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a denoiser call from flattened keys (the inverse of the trace's flattening)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(NEST)
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


@dataclass(frozen=True)
class Walk:
    """The levels a scheduler walks and the model timesteps it hands the model there.

    Attributes:
        sigmas: (N + 1,) float32 levels, decreasing to the last.
        timesteps: (N,) float32 model timesteps at sigmas[:-1]: the pipeline scheduler's own on
            its native walk (e.g. UniPC's truncated integers for Wan), else the model's map.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def of(cls, scheduler: Any) -> "Walk":
        """The walk an AccelScheduler (one evaluation a step) set up in its latest set_timesteps."""
        return cls(scheduler.solver_sigmas.detach().float().cpu().clone(),
                   scheduler.timesteps.detach().float().cpu().clone())


@dataclass
class Conditioning:
    """Everything a pipeline passes its denoiser besides the latents and the timestep.

    Attributes:
        rows: per-prompt tensors (R, ...): rows 0..P-1 the cond branch, P..2P-1 the uncond branch
            (when `has_uncond`); keys of nested arguments are joined with "/".
        shared: tensors every call gets unchanged (e.g. FLUX's img_ids (N, 3)).
        constants: non-tensor arguments (return_dict, attention kwargs, ...), JSON values.
        prompts: P, the number of prompts.
        has_uncond: whether the pipeline ran an uncond branch (classifier-free guidance).
        mode: "named", "ordered" or "batched" (accel.branch_hook.branch_mode).
        x_name: the latent argument ("hidden_states", or "sample" for UNets).
        x_shape: the latent of one sample, e.g. (4096, 64) packed FLUX tokens or (16, 21, 60, 104) Wan.
        x_dtype: the dtype the pipeline passes the latents in.
        timestep_scale: the `timestep` argument is this times the scheduler's model timestep.
        timestep_shape: the timestep argument's shape after the batch dimension (() for (B,)), or
            None when the pipeline passes a scalar.
        timestep_dtype: its dtype.
    """

    rows: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    constants: dict[str, Any]
    prompts: int
    has_uncond: bool
    mode: str
    x_name: str
    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    timestep_scale: float
    timestep_shape: tuple[int, ...] | None
    timestep_dtype: torch.dtype

    def header(self) -> dict[str, str]:
        """Everything but the tensors, as safetensors metadata."""
        layout = {"constants": self.constants, "prompts": self.prompts, "has_uncond": self.has_uncond,
                  "mode": self.mode, "x_name": self.x_name, "x_shape": list(self.x_shape),
                  "x_dtype": str(self.x_dtype).removeprefix("torch."), "timestep_scale": self.timestep_scale,
                  "timestep_shape": None if self.timestep_shape is None else list(self.timestep_shape),
                  "timestep_dtype": str(self.timestep_dtype).removeprefix("torch.")}
        return {"accel.conditioning": json.dumps(layout, sort_keys=True)}

    def save(self, path: str | Path, meta: dict[str, str]) -> Path:
        """Writes the tensors and header (plus `meta`, the fingerprint) as one safetensors file."""
        from accel.io import save_safetensors

        tensors = {f"rows{NEST}{k}": v for k, v in self.rows.items()}
        tensors.update({f"shared{NEST}{k}": v for k, v in self.shared.items()})
        return save_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                {**self.header(), **meta})

    @classmethod
    def load(cls, path: str | Path) -> tuple["Conditioning", dict[str, str]]:
        """(the conditioning, the rest of the file's metadata)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        layout = json.loads(metadata.pop("accel.conditioning"))
        tensors = load_file(str(path))
        part = lambda name: {k.split(NEST, 1)[1]: v for k, v in tensors.items()  # noqa: E731
                             if k.startswith(name + NEST)}
        shape = layout["timestep_shape"]
        return cls(part("rows"), part("shared"), layout["constants"], layout["prompts"], layout["has_uncond"],
                   layout["mode"], layout["x_name"], tuple(layout["x_shape"]), getattr(torch, layout["x_dtype"]),
                   layout["timestep_scale"], None if shape is None else tuple(shape),
                   getattr(torch, layout["timestep_dtype"])), metadata


@dataclass
class CallSettings:
    """How the pipeline is called while tracing (the teacher's inputs).

    Attributes:
        height, width: image size in pixels (None: the pipeline's default).
        frames: frames per video (video pipelines; None: the default).
        negative_prompt: the negative prompt of the uncond branch (None: the pipeline's default).
        call_kwargs: further call arguments, e.g. {max_sequence_length: 256, guidance_scale: 3.5}.
        guidance: the classifier-free guidance scale to trace with (> 1 records the uncond branch).
    """

    height: int | None = None
    width: int | None = None
    frames: int | None = None
    negative_prompt: str | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    guidance: float = 1.0

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
