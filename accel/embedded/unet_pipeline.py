"""The embedded epsilon UNet as a real diffusers pipeline: `UNetDigitsPipeline`.

Loaded with `from_pretrained` from a folder holding `model_index.json`, `unet/` (a `UNet2DModel`,
class-conditional with the null class 10 for CFG) and `scheduler/` (a diffusers scheduler built on
the model's DDPM betas; the shipped one is DDIM with trailing timesteps). The loop is Stable
Diffusion's: the latents start as noise times the scheduler's `init_noise_sigma`, each step calls
`scale_model_input`, the UNet at the scheduler's timestep, and `step`. With guidance the cond and
uncond branches are two UNet calls, cond first (the "ordered" branch mode of `accel.apply`, so
caches keep one state per branch).

    pipe = UNetDigitsPipeline.from_pretrained(UNET_DIGITS_DIR)
    images = pipe(class_labels=[3, 7], num_inference_steps=20, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # (2, 1, 16, 16)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from accel.embedded.model import NULL_CLASS
from accel.embedded.pipeline import DigitsPipelineMixin


class UNetDigitsPipeline(DigitsPipelineMixin, DiffusionPipeline):
    """Class-conditional 16x16 digits from the embedded epsilon UNet (VP, SD's scaled-linear betas).

    Args:
        unet: the UNet2DModel predicting the noise of VP latents x = sqrt(abar) x0 + sqrt(1 - abar) eps.
        scheduler: any diffusers scheduler for epsilon models on the same betas (DDIM ships).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._guidance_scale = 1.0

    def epsilon(self, latents: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, 1, H, W) of the UNet input (B, 1, H, W) at the DDPM timestep (scalar or (B,))."""
        timestep = torch.as_tensor(timestep, device=latents.device).to(latents.dtype).expand(latents.shape[0])
        return self.unet(latents, timestep, class_labels=labels).sample

    def _step_kwargs(self, generator: Any) -> dict:
        """`generator` for schedulers whose step draws noise (DDPM, DDIM with eta), as SD passes it."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted and generator is not None else {}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: Sequence[int] | torch.Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, height: int = 16, width: int = 16,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt", return_dict: bool = True,
                 callback_on_step_end: Callable[..., dict] | None = None) -> ImagePipelineOutput | tuple:
        """Generates digits.

        Args:
            prompt: prompts naming one digit each ("a handwritten 3"); or give `class_labels`.
            class_labels: digits 0-9, one per image.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance scale (1: the cond branch only).
            height, width: image size in pixels (multiples of 4; the model was trained at 16).
            generator: one generator, or one per image (each image's noise from its own).
            latents: initial latents (B, 1, H, W), used as given (not scaled by init_noise_sigma).
            output_type: "pt" (B, 1, H, W) in [0, 1], "latent" (the raw [-1, 1] sample), "np" or "pil".
            return_dict: return an ImagePipelineOutput rather than a tuple.
            callback_on_step_end: called as fn(pipe, step, timestep, {"latents": ...}) after each step.
        """
        device = self._execution_device
        labels = self._labels(prompt, class_labels, device)
        self._guidance_scale = float(guidance_scale)
        dtype = self.unet.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor((len(labels), 1, height, width), generator=generator, device=device, dtype=dtype)
            latents = latents * self.scheduler.init_noise_sigma
        latents = latents.to(device=device, dtype=dtype)
        null = torch.full_like(labels, NULL_CLASS)
        step_kwargs = self._step_kwargs(generator)
        for index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, timestep)
            prediction = self.epsilon(model_input, timestep, labels)
            if self.do_classifier_free_guidance:
                unconditional = self.epsilon(model_input, timestep, null)
                prediction = unconditional + self._guidance_scale * (prediction - unconditional)
            latents = self.scheduler.step(prediction, timestep, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, index, timestep, {"latents": latents}).get("latents", latents)
        return self._output(latents, output_type, return_dict)
