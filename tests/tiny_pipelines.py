"""Tiny random-weight diffusers pipelines of every transformer / UNet family, built offline.

`FAMILIES[name].build()` returns a pipeline made from tiny configs (a few blocks, a few tokens)
with the scheduler class and settings the family's released model ships, plus the keyword
arguments of one call. Text encoders and tokenizers are None and embeddings are passed directly;
a VAE is built only where the pipeline needs one (image inputs, DiT's decode), and otherwise the
call returns latents. Image and text token counts differ in every family, so the two streams are
never confused. `load(name, folder)` saves the pipeline with `save_pretrained` and loads it back
with `DiffusionPipeline.from_pretrained`, as a user would.

Used by tests/test_pipeline_families.py and scripts/family_table.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from caching.testing import tiny_model
from tiny_parts import Built, cond, embeds, flux_scheduler, make_pipeline, masks, pixart_dpm, pooled, unipc_flow
from tiny_video_pipelines import allegro, cogvideox, hunyuanvideo, ltx, mochi, wan


@dataclass(frozen=True)
class Family:
    """One pipeline family.

    Attributes:
        name: the family's key in FAMILIES.
        build: () -> (pipeline, keyword arguments of one call).
        guidance_scale: the CFG scale the call uses (1: the family runs one branch).
        block_lists: the denoiser's block lists, in execution order, discovery must find (() for a UNet).
    """

    name: str
    build: Callable[[], Built]
    guidance_scale: float
    block_lists: tuple[str, ...]


def _flux() -> Built:
    from diffusers import FluxPipeline
    pipe = make_pipeline(FluxPipeline, scheduler=flux_scheduler(), transformer=tiny_model("FluxTransformer2DModel").model)
    return pipe, dict(**cond(16), **pooled(16), true_cfg_scale=2.0, height=32, width=32)


def _tiny_vae_kl(latent_channels: int):
    """AutoencoderKL with one block: no spatial downsampling (vae_scale_factor 1)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _flux_kontext() -> Built:
    from diffusers import FluxKontextPipeline
    from PIL import Image
    pipe = make_pipeline(FluxKontextPipeline, scheduler=flux_scheduler(), vae=_tiny_vae_kl(1),
                     transformer=tiny_model("FluxTransformer2DModel").model)
    image = Image.new("RGB", (4, 4), (128, 64, 32))
    return pipe, dict(image=image, prompt_embeds=embeds(1, 3, 16), pooled_prompt_embeds=embeds(1, 16),
                      guidance_scale=1.0, height=6, width=6, max_area=36, _auto_resize=False)


def _flux2() -> Built:
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4))
    pipe = make_pipeline(Flux2Pipeline, scheduler=flux_scheduler(time_shift_type="exponential"), transformer=transformer)
    return pipe, dict(prompt_embeds=embeds(1, 3, 16), guidance_scale=4.0, height=32, width=32)


def _chroma() -> Built:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32,
                                           approximator_layers=1, approximator_num_channels=16)
    pipe = make_pipeline(ChromaPipeline, scheduler=flux_scheduler(), transformer=transformer)
    return pipe, dict(**cond(32), **masks(dtype=torch.float32), guidance_scale=2.0, height=32, width=32)


def _sd3() -> Built:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    pipe = make_pipeline(StableDiffusion3Pipeline, transformer=tiny_model("SD3Transformer2DModel").model,
                     scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, dict(**cond(16), **pooled(16), height=32, width=32, guidance_scale=2.0)


def _qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                           base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


def _qwen_transformer():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def _qwen_kwargs() -> dict:
    return dict(**cond(16), **masks(prompt="prompt_embeds_mask"), true_cfg_scale=2.0)


def _qwenimage() -> Built:
    from diffusers import QwenImagePipeline
    pipe = make_pipeline(QwenImagePipeline, scheduler=_qwen_scheduler(), transformer=_qwen_transformer())
    return pipe, dict(**_qwen_kwargs(), height=32, width=32)


def _qwenimage_edit() -> Built:
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline
    from PIL import Image
    torch.manual_seed(0)
    # The pipeline resizes the input image to about 1024 x 1024 whatever its size; seven 2x stages
    # without residual blocks encode that to 8 x 8 latents (16 image tokens after 2x2 packing).
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * 8, num_res_blocks=0,
                                 temperal_downsample=[False] * 7, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = make_pipeline(QwenImageEditPipeline, scheduler=_qwen_scheduler(), vae=vae, transformer=_qwen_transformer())
    image = Image.new("RGB", (32, 32), (128, 64, 32))
    return pipe, dict(image=image, **_qwen_kwargs(), height=512, width=512)


def _cogview4() -> Built:
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                             num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                             time_embed_dim=8, condition_dim=4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                                                base_image_seq_len=256, time_shift_type="linear")
    pipe = make_pipeline(CogView4Pipeline, transformer=transformer, scheduler=scheduler)
    return pipe, dict(**cond(32, tokens=16), height=32, width=32, guidance_scale=2.0)


def _lumina2() -> Built:
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=3,
                                            num_refiner_layers=1, num_attention_heads=1, num_kv_heads=1,
                                            multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
                                            scaling_factor=1.0, axes_dim_rope=(4, 2, 2), cap_feat_dim=8)
    pipe = make_pipeline(Lumina2Pipeline, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0))
    return pipe, dict(**cond(8), **masks(), height=32, width=32, guidance_scale=2.0)


def _sana() -> Built:
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    pipe = make_pipeline(SanaPipeline, transformer=transformer, scheduler=scheduler)
    return pipe, dict(negative_prompt=None, **cond(8), **masks(), height=64, width=64, guidance_scale=2.0,
                      use_resolution_binning=False, complex_human_instruction=None)


def _pixart(sigma: bool) -> Built:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = make_pipeline(cls, scheduler=pixart_dpm(), transformer=tiny_model("PixArtTransformer2DModel").model)
    return pipe, dict(prompt=None, negative_prompt=None, **cond(16), **masks(), height=32, width=32,
                      guidance_scale=2.0, use_resolution_binning=False)


def _hidream() -> Built:
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
    torch.manual_seed(0)
    # The pipeline always renders about 128 x 128 latents (1024 x 1024 pixels); 16 x 16 patches keep
    # that at 64 image tokens. Each of the 4 blocks reads its own Llama layer.
    transformer = HiDreamImageTransformer2DModel(patch_size=16, in_channels=4, out_channels=4, num_layers=2,
                                                 num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                                                 caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
                                                 num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                 max_resolution=(128, 128), llama_layers=(0, 1, 2, 3)).eval()
    pipe = make_pipeline(HiDreamImagePipeline, scheduler=unipc_flow(3.0), transformer=transformer)
    llama = dict(prompt_embeds_llama3=embeds(4, 1, 3, 16), negative_prompt_embeds_llama3=embeds(4, 1, 3, 16, seed=1))
    return pipe, dict(prompt_embeds_t5=embeds(1, 3, 32), negative_prompt_embeds_t5=embeds(1, 3, 32, seed=1),
                      **llama, **pooled(64), height=32, width=32, guidance_scale=2.0)


def _auraflow() -> Built:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                             num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=4,
                                             caption_projection_dim=32, joint_attention_dim=32, out_channels=4,
                                             pos_embed_max_size=16)
    pipe = make_pipeline(AuraFlowPipeline, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73))
    return pipe, dict(prompt=None, **cond(32), **masks(), height=32, width=32, guidance_scale=2.0)


def _dit() -> Built:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(0)
    # DiTPipeline always decodes: a one-block VAE (no downsampling) over the 8 x 8 latent.
    vae = AutoencoderKL(sample_size=8, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    # 1000 classes: the pipeline's unconditional class is index 1000. Learned sigma: 2 x 4 output channels.
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label={0: "zero", 1: "one"})
    return pipe, dict(class_labels=[1], guidance_scale=2.0)


def _sd15() -> Built:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = make_pipeline(StableDiffusionPipeline, unet=tiny_model("UNet2DConditionModel").model, scheduler=scheduler,
                     requires_safety_checker=False)
    return pipe, dict(**cond(16), height=32, width=32, guidance_scale=2.0)


def _sdxl() -> Built:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
                                cross_attention_dim=16, norm_num_groups=4).eval()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1, interpolation_type="linear")
    pipe = make_pipeline(StableDiffusionXLPipeline, unet=unet, scheduler=scheduler)
    return pipe, dict(**cond(16), **pooled(8), height=32, width=32, guidance_scale=2.0)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("flux", _flux, 2.0, ("transformer_blocks", "single_transformer_blocks")),
    Family("flux-kontext", _flux_kontext, 1.0, ("transformer_blocks", "single_transformer_blocks")),
    Family("flux2", _flux2, 1.0, ("transformer_blocks", "single_transformer_blocks")),
    Family("chroma", _chroma, 2.0, ("transformer_blocks", "single_transformer_blocks")),
    Family("sd3", _sd3, 2.0, ("transformer_blocks",)),
    Family("qwenimage", _qwenimage, 2.0, ("transformer_blocks",)),
    Family("qwenimage-edit", _qwenimage_edit, 2.0, ("transformer_blocks",)),
    Family("hunyuanvideo", hunyuanvideo, 2.0, ("transformer_blocks", "single_transformer_blocks")),
    Family("wan21", lambda: wan(3.0, False), 2.0, ("blocks",)),
    Family("wan22", lambda: wan(12.0, True), 2.0, ("blocks",)),
    Family("ltx", ltx, 2.0, ("transformer_blocks",)),
    Family("cogvideox", cogvideox, 2.0, ("transformer_blocks",)),
    Family("cogview4", _cogview4, 2.0, ("transformer_blocks",)),
    Family("lumina2", _lumina2, 2.0, ("layers",)),
    Family("sana", _sana, 2.0, ("transformer_blocks",)),
    Family("pixart-alpha", lambda: _pixart(False), 2.0, ("transformer_blocks",)),
    Family("pixart-sigma", lambda: _pixart(True), 2.0, ("transformer_blocks",)),
    Family("hidream", _hidream, 2.0, ("double_stream_blocks", "single_stream_blocks")),
    Family("auraflow", _auraflow, 2.0, ("joint_transformer_blocks", "single_transformer_blocks")),
    Family("mochi", mochi, 2.0, ("transformer_blocks",)),
    Family("allegro", allegro, 2.0, ("transformer_blocks",)),
    Family("dit", _dit, 2.0, ("transformer_blocks",)),
    Family("sd15", _sd15, 2.0, ()),  # UNets: no block lists
    Family("sdxl", _sdxl, 2.0, ()),
]}


def load(name: str, folder) -> tuple[Any, dict]:
    """Builds family `name`, saves it with save_pretrained and loads it back with DiffusionPipeline.from_pretrained.

    Components the tiny pipeline lacks (text encoders, tokenizers, a VAE) are passed as None, as a
    user loading a checkpoint without them would.
    """
    from diffusers import DiffusionPipeline
    pipe, kwargs = FAMILIES[name].build()
    pipe.save_pretrained(folder)
    absent = {key: None for key, component in pipe.components.items() if component is None}
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's primary denoiser (`transformer`, else `unet`)."""
    model = getattr(pipe, "transformer", None)
    return model if isinstance(model, torch.nn.Module) else pipe.unet


def run(pipe: Any, kwargs: dict, steps: int) -> torch.Tensor:
    """One call with a fixed seed; the latents (or DiT's decoded images) as a tensor."""
    output_type = "pt" if type(pipe).__name__ == "DiTPipeline" else "latent"
    out = pipe(**kwargs, num_inference_steps=steps, output_type=output_type, generator=torch.Generator().manual_seed(0))
    for field in ("frames", "images"):
        value = getattr(out, field, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    raise ValueError(f"{type(pipe).__name__} returned no frames or images")
