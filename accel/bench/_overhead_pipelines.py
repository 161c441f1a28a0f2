"""The FluxPipelines `accel bench overhead` times: the tiny CPU one and a FLUX-width one for a GPU.

Both are real `diffusers.FluxPipeline`s with random weights and no text encoders or VAE: the
prompt embeddings are fixed random tensors and the call returns latents, so a generation is the
denoising loop alone (scheduler, transformer, pipeline code), which is what accel's hooks and
scheduler add to.

* "tiny": `caching.testing.tiny_model("FluxTransformer2DModel")` (2 double + 2 single blocks, width
  16), the model the test suite drives; at 256x256 it sees 256 image tokens.
* "small": the FLUX layout at width 128 (2 heads x 64, text width 128, 32 text tokens) with 2 double
  and 4 single blocks: on a CPU its blocks, not Python, take most of a step, as at FLUX width on a GPU.
* "flux-width": FLUX.1's width (24 heads x 128 = 3072, text width 4096, 512 text tokens, guidance
  embedding) with 4 double and 8 single blocks; 1024x1024 gives 4,096 image tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

MODELS = ("tiny", "small", "flux-width")
# FluxTransformer2DModel arguments and text tokens of the built models ("tiny" is caching.testing's)
CONFIGS = {
    "small": (dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128,
                   axes_dims_rope=(8, 28, 28)), 32),
    "flux-width": (dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)), 512),
}


@dataclass(frozen=True)
class PipelineSpec:
    """What to build and how to call it.

    Attributes:
        model: "tiny", "small" or "flux-width".
        height / width: the image size the pipeline is called with (pixels; latents are 1/8).
        device: "cpu" or "cuda".
        dtype: the transformer's dtype ("float32", "bfloat16", "float16").
        seed: seeds the weights, the embeddings and the initial noise.
    """

    model: str = "tiny"
    height: int = 256
    width: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"overhead bench: model {self.model!r} is unknown; use one of {', '.join(MODELS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"overhead bench: dtype {self.dtype!r}; use float32, bfloat16 or float16")
        for name, value in (("height", self.height), ("width", self.width)):
            if value < 16 or value % 16:
                raise ValueError(f"overhead bench: {name}={value} must be a multiple of 16 (>= 16)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _transformer(spec: PipelineSpec) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(spec.seed)
    if spec.model == "tiny":
        from caching.testing import tiny_model

        return tiny_model("FluxTransformer2DModel", seed=spec.seed).model
    with torch.device(spec.device):
        model = FluxTransformer2DModel(**CONFIGS[spec.model][0])
    return model.eval()


def build_pipeline(spec: PipelineSpec) -> tuple[Any, dict]:
    """A FluxPipeline on `spec.device` and the keyword arguments of one call (without steps).

    Returns:
        (pipeline, call kwargs): prompt embeddings (1, T, D) and pooled (1, P), the size,
        output_type "latent".
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    transformer = _transformer(spec).to(spec.device, spec.torch_dtype)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    config = transformer.config
    tokens = 3 if spec.model == "tiny" else CONFIGS[spec.model][1]
    generator = torch.Generator().manual_seed(spec.seed + 1)
    prompt = torch.randn(1, tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    kwargs = dict(prompt_embeds=prompt.to(spec.device, spec.torch_dtype),
                  pooled_prompt_embeds=pooled.to(spec.device, spec.torch_dtype),
                  height=spec.height, width=spec.width, output_type="latent")
    return pipe, kwargs


def copy_pipeline(pipe: Any) -> Any:
    """An independent copy (its own transformer with the same weights), for one benchmark variant."""
    return copy.deepcopy(pipe)
