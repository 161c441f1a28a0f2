"""Tiny random-weight models of every supported class, a toy transformer, and loops that drive them.

For tests and quick checks: each factory builds a model from a config in well under a second,
offline, and gives the inputs of one call. `run_steps` walks a toy trajectory, publishing a
StepContext per call, so caches see exactly what a sampler would show them. `ToyTransformer` is
a registered model whose blocks compute known functions (a shift by the timestep embedding, a
square, a doubling, a token-wise MLP), so forecasts and calibrations can be checked against
closed forms; `drive` calls any model with given inputs per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from step_context import StepContext, guidance_branch, new_generation, publish_step

from .layouts import BlockLayout, ModelLayout, register_block_layout, register_model_layout


class ToyBlock(torch.nn.Module):
    """A block computing a known function of (hidden_states (B, N, D), temb (B,)).

    Kinds: "shift" -> hidden + temb * direction; "square" -> hidden ** 2; "double" -> 2 hidden;
    "mlp" -> hidden + mlp(hidden) with a token-wise linear `mlp`.
    """

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.mlp = torch.nn.Linear(dim, dim)
        self.register_buffer("direction", torch.linspace(-1.0, 1.0, dim))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.kind == "shift":
            return hidden_states + temb[:, None, None] * self.direction
        if self.kind == "square":
            return hidden_states ** 2
        if self.kind == "double":
            return hidden_states * 2
        return hidden_states + self.mlp(hidden_states)


class ToyTransformer(torch.nn.Module):
    """A chain of ToyBlocks; returns a 1-tuple like diffusers models with return_dict=False."""

    def __init__(self, dim: int = 4, num_blocks: int = 2, kind: str = "shift") -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyBlock(dim, kind) for _ in range(num_blocks))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor]:
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return (hidden_states,)


register_model_layout(ToyTransformer, ModelLayout("transformer", ("blocks",)))
register_block_layout(ToyBlock, BlockLayout(attention={"mlp": ("mlp",)}, token_modules=("mlp",),
                                            probe=lambda block, bound: bound["hidden_states"]))


def drive(model: torch.nn.Module, inputs: list[dict[str, Any]], *, sigmas: list[float] | None = None,
          branch: str = "cond", generation: int | None = None, stages: int = 1) -> list[torch.Tensor]:
    """Calls `model(**inputs[i])` at step i of a len(inputs)-step run (`stages` calls per step).

    Returns the first output tensor of every call, in order.
    """
    num_steps = len(inputs)
    generation = new_generation() if generation is None else generation
    outputs = []
    with torch.no_grad():
        for index, kwargs in enumerate(inputs):
            sigma = sigmas[index] if sigmas is not None else 1.0 - index / num_steps
            for stage in range(stages):
                context = StepContext(index, num_steps, sigma, sigma * 1000, generation=generation, stage=stage)
                with publish_step(context), guidance_branch(branch):
                    output = model(**kwargs)
                outputs.append(output if isinstance(output, torch.Tensor) else output[0])
    return outputs


@dataclass
class TinyModel:
    """A tiny model and how to call it.

    Attributes:
        model: the diffusers model (eval mode).
        inputs: (batch, size, seed) -> keyword arguments of one call, with the latent under
            `latent_key`.
        latent_key: name of the latent argument that the toy trajectory updates.
    """

    model: torch.nn.Module
    inputs: Callable[[int, int, int], dict[str, Any]]
    latent_key: str = "hidden_states"


def _flux() -> TinyModel:
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        return dict(hidden_states=torch.randn(batch, size * size, 4, generator=g),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                    pooled_projections=torch.randn(batch, 16, generator=g),
                    timestep=torch.full((batch,), 0.5), img_ids=img_ids, txt_ids=torch.zeros(3, 3))
    return TinyModel(model, inputs)


def _sd3() -> TinyModel:
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                  pos_embed_max_size=16)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                    pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 500.0))
    return TinyModel(model, inputs)


def _dit() -> TinyModel:
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                    timestep=torch.full((batch,), 500, dtype=torch.long),
                    class_labels=torch.arange(batch) % 10)
    return TinyModel(model, inputs)


def _pixart() -> TinyModel:
    from diffusers import PixArtTransformer2DModel
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=16, use_additional_conditions=False)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                    timestep=torch.full((batch,), 500.0),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return TinyModel(model, inputs)


def _wan() -> TinyModel:
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=3, rope_max_seq_len=32)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, 2, size, size, generator=g),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                    timestep=torch.full((batch,), 500.0))
    return TinyModel(model, inputs)


def _unet_cond() -> TinyModel:
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                 cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g))
    return TinyModel(model, inputs, "sample")


def _unet() -> TinyModel:
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=4)

    def inputs(batch: int, size: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500))
    return TinyModel(model, inputs, "sample")


TINY_MODELS: dict[str, Callable[[], TinyModel]] = {
    "FluxTransformer2DModel": _flux, "SD3Transformer2DModel": _sd3, "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart, "WanTransformer3DModel": _wan,
    "UNet2DConditionModel": _unet_cond, "UNet2DModel": _unet,
}


def tiny_model(name: str, seed: int = 0) -> TinyModel:
    """A tiny random-weight model of class `name` (a key of TINY_MODELS), in eval mode."""
    torch.manual_seed(seed)
    tiny = TINY_MODELS[name]()
    tiny.model.eval()
    return tiny


def run_steps(tiny: TinyModel, num_steps: int, *, batch: int = 1, size: int = 4, seed: int = 0,
              branches: tuple[str, ...] = ("cond",), generation: int | None = None,
              publish: bool = True) -> list[torch.Tensor]:
    """Drives `tiny` along a toy Euler trajectory; returns the model output of every call.

    Each step calls the model once per branch inside `publish_step` / `guidance_branch`; the
    latent moves by -output / num_steps (channels beyond the latent's are dropped).
    """
    kwargs = tiny.inputs(batch, size, seed)
    generation = new_generation() if generation is None else generation
    outputs = []
    with torch.no_grad():
        for index in range(num_steps):
            sigma = 1.0 - index / num_steps
            context = StepContext(index, num_steps, sigma, sigma * 1000, generation=generation)
            step_outputs = []
            for branch in branches:
                with publish_step(context) if publish else contextlib.nullcontext(), guidance_branch(branch):
                    out = tiny.model(**kwargs, return_dict=False)[0]
                step_outputs.append(out)
                outputs.append(out)
            latent = kwargs[tiny.latent_key]
            update = step_outputs[0][:, :latent.shape[1]]
            kwargs[tiny.latent_key] = latent - update / num_steps
    return outputs

