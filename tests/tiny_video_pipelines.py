"""Tiny random-weight video pipelines (HunyuanVideo, Wan 2.1 / 2.2, LTX-Video, CogVideoX, Mochi,
Allegro), built offline; the families are listed in tests/tiny_pipelines.py."""

from __future__ import annotations

import torch

from caching.testing import tiny_model
from tiny_parts import Built, cond, make_pipeline, masks, pooled, unipc_flow


def hunyuanvideo() -> Built:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=2, num_single_layers=2,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = make_pipeline(HunyuanVideoPipeline, transformer=transformer, scheduler=scheduler)
    return pipe, dict(**cond(16), **masks(), **pooled(8), true_cfg_scale=2.0, guidance_scale=6.0,
                      height=16, width=16, num_frames=5)


def wan(flow_shift: float, two_experts: bool) -> Built:
    from diffusers import WanPipeline
    transformer = tiny_model("WanTransformer3DModel").model
    extra = dict(transformer_2=tiny_model("WanTransformer3DModel", seed=1).model, boundary_ratio=0.875) \
        if two_experts else {}
    pipe = make_pipeline(WanPipeline, scheduler=unipc_flow(flow_shift), transformer=transformer, **extra)
    return pipe, dict(**cond(16), height=32, width=32, num_frames=5, guidance_scale=2.0)


def ltx() -> Built:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=3, caption_channels=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
                                                time_shift_type="exponential")
    pipe = make_pipeline(LTXPipeline, scheduler=scheduler, transformer=transformer)
    return pipe, dict(**cond(32), **masks(), height=64, width=64, num_frames=9, guidance_scale=2.0)


def cogvideox() -> Built:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=3,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=8)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")
    pipe = make_pipeline(CogVideoXPipeline, transformer=transformer, scheduler=scheduler)
    return pipe, dict(**cond(32, tokens=8), height=16, width=16, num_frames=9, guidance_scale=2.0)


def mochi() -> Built:
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                                          pooled_projection_dim=16, in_channels=12, out_channels=None,
                                          qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
                                          activation_fn="swiglu", max_sequence_length=16)
    pipe = make_pipeline(MochiPipeline, scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
                     transformer=transformer)
    return pipe, dict(**cond(32), **masks(), height=32, width=32, num_frames=7, guidance_scale=2.0)


def allegro() -> Built:
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, EulerAncestralDiscreteScheduler
    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                            out_channels=4, num_layers=3, cross_attention_dim=24, sample_width=8,
                                            sample_height=8, sample_frames=8, caption_channels=24)
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                timestep_spacing="linspace")
    pipe = make_pipeline(AllegroPipeline, transformer=transformer, scheduler=scheduler)
    return pipe, dict(negative_prompt=None, **cond(24), **masks(), height=16, width=16, num_frames=8,
                      guidance_scale=2.0)
