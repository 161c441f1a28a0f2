"""A diffusers pipeline's denoiser as a `samplers.Denoiser`, called without the pipeline.

From a traced `Conditioning`, `PipelineDenoiser.model_fn(x, sigma, prompt=...)` calls the
pipeline's denoiser module with the latents `x` in the layout the pipeline passes them (packed
tokens for FLUX, (C, F, H, W) for Wan), the timestep the pipeline would pass at noise level `sigma`
(`timestep_scale` times the model timestep: t for FLUX, 1000 t for SD3 and Wan, the DDPM index for
VP models) and the recorded arguments of prompt row `prompt`. Classifier-free guidance combines
the cond rows with the uncond rows `prompt + P`: with `samplers.cfg_model_fn` (two calls marked
"cond" / "uncond", uncond reuse included) where the pipeline calls its branches separately, or in
one call marked "batched", as [uncond, cond], where the pipeline batches them. The module is the
pipeline's own, so a LoRA or a cache installed on it acts on every call.
"""

from __future__ import annotations

from typing import Any

import torch

import samplers
from accel.training.trace import Conditioning, TraceError, Walk, unflatten
from step_context import guidance_branch


def _prediction(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample


class PipelineDenoiser:
    """Calls a pipeline's denoiser with traced arguments.

    Args:
        module: the pipeline's denoiser (its transformer or unet).
        conditioning: what the pipeline passes it (see accel.training.trace).
        prediction_type: the raw output ("flow", "epsilon", "v", "x0"), from the scheduler config.
        schedule: the model's noise schedule (samplers.FlowSchedule or VPSchedule).
        device: where the per-prompt rows are kept (the denoiser's device).
    """

    def __init__(self, module: torch.nn.Module, conditioning: Conditioning, prediction_type: str, schedule: Any,
                 device: torch.device | str = "cpu"):
        self.module, self.conditioning = module, conditioning
        self.prediction_type, self.schedule = prediction_type, schedule
        self.rows = {k: v.to(device) for k, v in conditioning.rows.items()}
        self.shared = {k: v.to(device) for k, v in conditioning.shared.items()}
        self._to_timestep = getattr(schedule, "sigma_to_timestep", None)
        # flow: timestep = scale * num_train_timesteps * t; 1.0 for FLUX (t), 1000.0 for SD3 / Wan
        self._flow_factor = conditioning.timestep_scale * getattr(schedule, "num_train_timesteps", 1000)
        inverse = 1 / conditioning.timestep_scale
        self._divisor = round(inverse) if abs(inverse - round(inverse)) < 1e-6 * inverse else None
        self._levels = torch.empty(0, device=device)
        self._native = torch.empty(0, device=device)

    def use_walk(self, walk: Walk) -> None:
        """Hands the model the scheduler's own timesteps at the levels of `walk`, as the pipeline does
        (Wan's UniPC truncates them to integers; elsewhere the model's map of sigma is used)."""
        device = self._levels.device
        known = set(self._levels.tolist())
        fresh = [i for i, level in enumerate(walk.sigmas[:-1].tolist()) if level not in known]
        self._levels = torch.cat([self._levels, walk.sigmas[:-1][fresh].to(device)])
        self._native = torch.cat([self._native, walk.timesteps[fresh].to(device)])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The `timestep` argument (B, *shape) the pipeline passes at noise levels sigma (B,)."""
        c = self.conditioning
        if self._to_timestep is None:
            value = sigma * self._flow_factor
        else:
            value = self._to_timestep(sigma) * c.timestep_scale
        if self._levels.numel():
            hit = sigma.float()[:, None] == self._levels[None, :]  # (B, M); no host sync
            native = (hit * self._native[None, :]).sum(dim=1)  # levels are distinct: one hit at most
            native = native / self._divisor if self._divisor is not None else native * c.timestep_scale
            value = torch.where(hit.any(dim=1), native.to(value.dtype), value)
        if not c.timestep_dtype.is_floating_point:
            value = value.round()
        value = value.to(c.timestep_dtype)
        if c.timestep_shape is None:
            return value[0]
        return value.reshape(-1, *([1] * len(c.timestep_shape))).expand(-1, *c.timestep_shape)

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, *, prompt: torch.Tensor) -> torch.Tensor:
        """The raw prediction (B, *x_shape) at latents x (B, *x_shape), levels sigma (B,), prompt rows (B,)."""
        c = self.conditioning
        arguments = {**self.shared, **{k: v[prompt] for k, v in self.rows.items()}, **c.constants}
        arguments = unflatten(arguments)
        arguments[c.x_name] = x.to(c.x_dtype)
        arguments["timestep"] = self.timestep(sigma)
        out = _prediction(self.module(**arguments))
        if out.shape != x.shape:
            raise TraceError(f"{type(self.module).__name__} returned {tuple(out.shape)} for latents {tuple(x.shape)}; "
                             "accel train needs a denoiser whose output has the latents' shape")
        return out.to(x.dtype)

    def denoiser(self, guidance: float = 1.0, uncond_interval: int = 1) -> samplers.Denoiser:
        """A samplers.Denoiser with classifier-free guidance `guidance` (1: the cond rows only).

        Args:
            guidance: CFG scale; > 1 needs the uncond rows (the pipeline traced with guidance).
            uncond_interval: compute the uncond branch every this many steps (separate calls only).

        Raises:
            ValueError: guidance without traced uncond rows, or uncond reuse on a batching pipeline.
        """
        c = self.conditioning
        fn = self.model_fn
        if guidance != 1.0:
            if not c.has_uncond:
                raise ValueError(f"guidance {guidance:g} needs the pipeline's uncond branch, but it ran none when "
                                 "traced; set objective.params.guidance > 1 (or the call argument that turns CFG on)")
            if c.mode == "batched":
                if uncond_interval > 1:
                    raise ValueError("student_uncond_interval > 1: this pipeline batches cond and uncond in one "
                                     "call, so the uncond branch cannot be skipped alone; set it to 1")
                fn = self._batched_guidance(guidance)
            else:
                rows = c.prompts
                fn = samplers.cfg_model_fn(self.model_fn, guidance, cond_key="prompt",
                                           uncond_value=lambda prompt: prompt + rows, uncond_interval=uncond_interval)
        return samplers.Denoiser(fn, prediction_type=self.prediction_type, schedule=self.schedule)

    def _batched_guidance(self, scale: float):
        rows = self.conditioning.prompts

        def guided(x: torch.Tensor, sigma: torch.Tensor, *, prompt: torch.Tensor) -> torch.Tensor:
            with guidance_branch("batched"):
                both = self.model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                     prompt=torch.cat([prompt + rows, prompt]))
            uncond, cond = both.chunk(2)
            return uncond + scale * (cond - uncond)

        return guided
