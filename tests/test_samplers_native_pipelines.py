"""End to end: accel.apply with Euler on schedule "auto" reproduces a pipeline's own FlowMatchEuler run,
text-to-image and img2img, on tiny random-weight pipelines saved and loaded with from_pretrained."""

from typing import Any

import pytest
import torch
from diffusers import (AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler,
                       FluxImg2ImgPipeline, FluxPipeline, MochiPipeline, MochiTransformer3DModel, PNDMScheduler,
                       QwenImagePipeline, QwenImageTransformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionImg2ImgPipeline, WanPipeline)

import accel
import accel.pipeline
from accel.stack import SamplerPlan, Stack, StackError
from caching.testing import tiny_model
from samplers import SOLVERS

FLUX_DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                use_dynamic_shifting=True)
STEPS = 6


def _embeds(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=0.3611, shift_factor=0.1159)


def _flux():
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=tiny_model("FluxTransformer2DModel").model)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), pooled_prompt_embeds=_embeds(1, 16), height=32, width=32)


def _sd3():
    pipe = StableDiffusion3Pipeline(transformer=tiny_model("SD3Transformer2DModel").model,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), pooled_prompt_embeds=_embeds(1, 16),
                      negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      negative_pooled_prompt_embeds=_embeds(1, 16, seed=1), height=32, width=32, guidance_scale=2.0)


def _wan():
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=tiny_model("WanTransformer3DModel").model)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      height=32, width=32, num_frames=5, guidance_scale=2.0)


def _cogview4():
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
                                             time_embed_dim=16, condition_dim=4, pos_embed_max_size=16,
                                             sample_size=8, rope_axes_dim=(4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.25, max_image_seq_len=4096,
                                                max_shift=0.75, time_shift_type="linear", use_dynamic_shifting=True)
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer.eval(),
                            scheduler=scheduler)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      height=32, width=32, guidance_scale=2.0)


def _qwenimage():
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift_terminal=0.02, use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer.eval())
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
                      height=32, width=32)


def _mochi():
    """Mochi's scheduler inverts flow time: its model takes t = 0 as noise and predicts x0 - eps."""
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                          pooled_projection_dim=16, in_channels=4, text_embed_dim=16,
                                          time_embed_dim=4, max_sequence_length=16)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer.eval())
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), prompt_attention_mask=torch.ones(1, 3),
                      negative_prompt_embeds=_embeds(1, 3, 16, seed=1), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=32, width=32, num_frames=7, guidance_scale=2.0)


def _flux_img2img():
    pipe = FluxImg2ImgPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV), vae=_vae(1), text_encoder=None,
                               tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=tiny_model("FluxTransformer2DModel").model)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), pooled_prompt_embeds=_embeds(1, 16), image=image,
                      height=16, width=16, strength=0.6)


def _sd_img2img():
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=_vae(4), text_encoder=None, tokenizer=None,
                                          unet=tiny_model("UNet2DConditionModel").model, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      image=image, strength=0.6, guidance_scale=2.0)


BUILDERS = {"flux": _flux, "sd3": _sd3, "wan": _wan, "cogview4": _cogview4, "qwenimage": _qwenimage,
            "mochi": _mochi, "flux-img2img": _flux_img2img, "sd-img2img": _sd_img2img}


def _load(kind: str, folder) -> tuple[Any, dict]:
    """Builds the tiny pipeline, saves it with save_pretrained and loads it back with from_pretrained."""
    pipe, kwargs = BUILDERS[kind]()
    pipe.save_pretrained(folder)
    absent = {name: None for name, component in pipe.components.items() if component is None}
    pipe = type(pipe).from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def _run(pipe, kwargs: dict, steps: int = STEPS) -> tuple[torch.Tensor, list[float]]:
    """The latents of one call and the timestep of every denoiser call."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    seen = []
    hook = denoiser.register_forward_pre_hook(
        lambda module, args, kw: seen.append(float((kw.get("timestep") if "timestep" in kw else args[1]).flatten()[0])),
        with_kwargs=True)
    try:
        with torch.no_grad():
            out = pipe(**kwargs, num_inference_steps=steps, output_type="latent",
                       generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return (out.frames if hasattr(out, "frames") else out.images), seen


@pytest.mark.parametrize("kind", ["flux", "sd3", "wan", "cogview4", "qwenimage", "mochi", "flux-img2img"])
def test_euler_on_auto_equals_the_pipelines_own_flow_match_euler(kind, tmp_path):
    pipe, kwargs = _load(kind, tmp_path)
    native, native_timesteps = _run(pipe, kwargs)
    accel.apply(pipe, Stack(SamplerPlan("euler", STEPS)))
    try:
        ours, our_timesteps = _run(pipe, kwargs)
        assert pipe.scheduler.schedule_name == "native"
    finally:
        accel.remove(pipe)
    assert our_timesteps == native_timesteps  # the model is called at exactly the native timesteps
    expected_calls = 4 if kind == "flux-img2img" else STEPS  # strength 0.6 of 6 steps: from int(2.4) on
    assert len(set(native_timesteps)) == expected_calls
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    torch.testing.assert_close(ours, native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
def test_img2img_with_a_two_evaluation_solver_is_refused_in_one_line(solver, tmp_path):
    pipe, kwargs = _load("flux-img2img", tmp_path)
    resolved = accel.apply(pipe, Stack(SamplerPlan(solver, STEPS)))
    assert any(line.startswith(f"mid-walk-start: {solver} takes 2 model evaluations per step") and
               "runs at strength 1 only" in line for line in resolved.decisions)
    try:
        with pytest.raises(ValueError, match=f"solver '{solver}' takes 2 model evaluations per step and cannot "
                                             "start mid-walk") as info:
            _run(pipe, kwargs)
        assert "\n" not in str(info.value)
        full, seen = _run(pipe, {**kwargs, "strength": 1.0})  # from the first timestep it runs
        assert torch.isfinite(full).all() and len(seen) == SOLVERS[solver].nfe(STEPS)
    finally:
        accel.remove(pipe)


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m"])
def test_stable_diffusion_img2img_runs_from_the_native_timestep(solver, tmp_path):
    pipe, kwargs = _load("sd-img2img", tmp_path)
    _, native_timesteps = _run(pipe, kwargs, steps=5)
    accel.apply(pipe, Stack(SamplerPlan(solver, 5)))
    try:
        out, seen = _run(pipe, kwargs, steps=5)
        assert pipe.scheduler.timesteps.tolist() == [801.0, 601.0, 401.0, 201.0, 1.0]  # PNDM's, leading + 1
    finally:
        accel.remove(pipe)
    # strength 0.6 of 5 steps starts at evaluation 2; PNDM lists 601 twice, so its own run starts there
    assert seen == [401.0, 201.0, 1.0] and native_timesteps == [601.0, 401.0, 201.0, 1.0]
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_auto_with_schedule_options_is_refused_before_anything_changes():
    pipe, _ = _flux()
    scheduler = pipe.scheduler
    with pytest.raises(StackError, match="FluxPipeline's scheduler: schedule 'auto' walks the pipeline's "
                                         "FlowMatchEulerDiscreteScheduler and takes no schedule options"):
        accel.apply(pipe, Stack(SamplerPlan("euler", STEPS, schedule_params={"shift": 2.0})))
    assert pipe.scheduler is scheduler and accel.pipeline.applied(pipe) is None
    resolved = accel.apply(pipe, Stack(SamplerPlan("euler", STEPS, schedule="flow", schedule_params={"shift": 2.0})))
    try:
        assert pipe.scheduler.describe() == "flow, flow schedule (shift 2.0)" and resolved.stack.sampler.steps == STEPS
    finally:
        accel.remove(pipe)
