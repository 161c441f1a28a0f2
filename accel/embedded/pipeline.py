"""The embedded flow model as a real diffusers pipeline: `FluxDigitsPipeline`.

The lab drives every model through `accel.apply` on a diffusers pipeline; this class makes the
shipped digit model one of them, loaded with `from_pretrained` from a folder holding
`model_index.json`, `transformer/` (a `FluxTransformer2DModel`), `conditioner/` (the class
embedding) and `scheduler/` (a `FlowMatchEulerDiscreteScheduler`). Like FLUX with true CFG, it
evaluates cond and uncond as two transformer calls named with `cache_context("cond" | "uncond")`.

    pipe = FluxDigitsPipeline.from_pretrained(FLUX_DIGITS_DIR)
    images = pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=4.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # (2, 1, 16, 16)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from accel.embedded.model import NULL_CLASS, ClassConditioner, image_ids, pack_latents, unpack_latents

_DIGIT = re.compile(r"(?<!\d)(\d)(?!\d)")
# diffusers' LoRA loading for pipelines whose only LoRA-loadable component is `transformer`
# (load_lora_weights, set_adapters, fuse_lora, unfuse_lora, delete_adapters, unload_lora_weights);
# the CogVideoX mixin is exactly that, with no model-specific key conversion.
TransformerLoraLoaderMixin = CogVideoXLoraLoaderMixin


def labels_from_prompts(prompts: str | Sequence[str]) -> list[int]:
    """Class labels named by prompts: the one digit each holds ("3", "a handwritten 7")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    labels = []
    for prompt in prompts:
        digits = _DIGIT.findall(str(prompt))
        if len(digits) != 1:
            raise ValueError(f"prompt {prompt!r}: the embedded digit model takes prompts naming one digit 0-9 "
                             "(e.g. 'a handwritten 3'), or class_labels")
        labels.append(int(digits[0]))
    return labels


class DigitsPipelineMixin:
    """What both embedded digit pipelines share: class labels from prompts or labels, the CFG switch,
    and the output conversion."""

    _guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def _labels(self, prompt: Any, class_labels: Any, device: torch.device) -> torch.Tensor:
        """The call's class labels (B,) on `device`, from prompts naming digits or from labels."""
        if (prompt is None) == (class_labels is None):
            raise ValueError(f"{type(self).__name__} needs either prompt or class_labels (not both)")
        labels = labels_from_prompts(prompt) if prompt is not None else class_labels
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= NULL_CLASS:
            raise ValueError(f"class_labels must be digits 0-{NULL_CLASS - 1}, got {labels.tolist()}")
        return labels.to(device)

    def _output(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """The final latents (B, 1, H, W) in [-1, 1] as `output_type` ("pt" in [0, 1], "latent", "np", "pil")."""
        images = latents if output_type == "latent" else ((latents.float() + 1) / 2).clamp(0, 1)
        if output_type in ("np", "pil"):
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class FluxDigitsPipeline(DigitsPipelineMixin, DiffusionPipeline, TransformerLoraLoaderMixin):
    """Class-conditional 16x16 digits from the embedded FLUX-architecture flow model.

    Args:
        transformer: the FluxTransformer2DModel predicting the flow velocity of packed 2x2 patches.
        conditioner: maps class labels (10 is the null class) to text-like tokens and a pooled vector.
        scheduler: any diffusers scheduler for flow models (FlowMatchEulerDiscreteScheduler ships).
    """

    model_cpu_offload_seq = "conditioner->transformer"

    def __init__(self, transformer: FluxTransformer2DModel, conditioner: ClassConditioner,
                 scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, conditioner=conditioner, scheduler=scheduler)
        self._guidance_scale = 1.0

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flow velocity (B, 1, H, W) of images (B, 1, H, W) at flow times sigma (B,)."""
        tokens, pooled = self.conditioner(labels)
        height, width = latents.shape[-2:]
        img_ids = image_ids(height, width, device=latents.device, dtype=latents.dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=latents.dtype)
        out = self.transformer(hidden_states=pack_latents(latents), encoder_hidden_states=tokens,
                               pooled_projections=pooled, timestep=sigma.to(latents.dtype), img_ids=img_ids,
                               txt_ids=txt_ids, return_dict=False)[0]
        return unpack_latents(out, height, width)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: Sequence[int] | torch.Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 4.0, height: int = 16, width: int = 16,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt", return_dict: bool = True,
                 callback_on_step_end: Callable[..., dict] | None = None) -> ImagePipelineOutput | tuple:
        """Generates digits.

        Args:
            prompt: prompts naming one digit each ("a handwritten 3"); or give `class_labels`.
            class_labels: digits 0-9, one per image.
            num_inference_steps: solver steps.
            guidance_scale: classifier-free guidance scale (1: the cond branch only).
            height, width: image size in pixels (multiples of 2; the model was trained at 16).
            generator: one generator, or one per image (each image's noise from its own).
            latents: initial noise (B, 1, H, W) instead of drawing it.
            output_type: "pt" (B, 1, H, W) in [0, 1], "latent" (the raw [-1, 1] sample), "np" or "pil".
            return_dict: return an ImagePipelineOutput rather than a tuple.
            callback_on_step_end: called as fn(pipe, step, timestep, {"latents": ...}) after each step.
        """
        device = self._execution_device
        labels = self._labels(prompt, class_labels, device)
        self._guidance_scale = float(guidance_scale)
        dtype = self.transformer.dtype
        if latents is None:
            latents = randn_tensor((len(labels), 1, height, width), generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype)
        # Uniform flow times 1, 1 - 1/N, ..., 1/N (then 0), as FluxPipeline passes them: the walk the
        # model was trained and measured on (FlowMatchEuler's own default ends at 1/1000 instead).
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        null = torch.full_like(labels, NULL_CLASS)
        for index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            sigma = (timestep / self.scheduler.config.num_train_timesteps).expand(len(labels)).to(device)
            with self.transformer.cache_context("cond"):
                prediction = self.velocity(latents, sigma, labels)
            if self.do_classifier_free_guidance:
                with self.transformer.cache_context("uncond"):
                    unconditional = self.velocity(latents, sigma, null)
                prediction = unconditional + self._guidance_scale * (prediction - unconditional)
            latents = self.scheduler.step(prediction, timestep, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, index, timestep, {"latents": latents}).get("latents", latents)
        return self._output(latents, output_type, return_dict)
