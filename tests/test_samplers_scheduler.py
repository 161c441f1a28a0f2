"""AccelScheduler: the native solvers as a diffusers scheduler, in tiny random-weight pipelines."""

import warnings

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel,
                       UniPCMultistepScheduler)

import samplers
from samplers import SOLVERS, FlowSchedule
from samplers.diffusers_scheduler import AccelScheduler
from step_context import current_step

VP = samplers.vp_schedule_from_betas()
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _smooth_model(x: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a network's raw output."""
    return 0.9 * x + 0.1 * torch.tanh(2 * x)


def _run_scheduler(scheduler: AccelScheduler, noise: torch.Tensor, steps: int, seen: list | None = None):
    """A diffusers-style loop: latents * init_noise_sigma, then one step() per timestep."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if seen is not None:
            seen.append((current_step(), float(t)))
        x = scheduler.step(_smooth_model(scheduler.scale_model_input(x, t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("prediction", ["flow", "epsilon"])
def test_scheduler_walks_exactly_the_native_solver(name, prediction):
    family_schedule = FlowSchedule() if prediction == "flow" else VP
    scheduler = AccelScheduler(solver=name, prediction_type=prediction, schedule_options=None)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    out = _run_scheduler(scheduler, noise, 5, seen)
    native = SOLVERS[name].fn(samplers.Denoiser(lambda x, s: _smooth_model(x), prediction, family_schedule),
                              noise, scheduler.solver_sigmas)
    torch.testing.assert_close(out, native, rtol=1e-5, atol=1e-5)
    assert len(scheduler.timesteps) == SOLVERS[name].nfe(5) == len(scheduler.sigmas) - 1
    assert current_step() is None and float(scheduler.sigmas[-1]) == 0.0
    contexts = [context for context, _ in seen]
    assert [c.sigma for c in contexts] == pytest.approx(scheduler.sigmas[:-1].tolist(), rel=1e-6)
    assert [c.step_index for c in contexts] == sorted(c.step_index for c in contexts)
    assert {c.num_steps for c in contexts} == {5} and len({c.generation for c in contexts}) == 1
    assert [c.timestep for c in contexts] == pytest.approx([t for _, t in seen], rel=1e-5, abs=1e-3)


def test_heun_timesteps_repeat_levels_like_diffusers_heun():
    scheduler = AccelScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0]
    seen = []
    _run_scheduler(scheduler, torch.zeros(1, 2), 4, seen)
    assert [c.stage for c, _ in seen] == [0, 1, 0, 1, 0, 1, 0]
    assert [c.step_index for c, _ in seen] == [0, 0, 1, 1, 2, 2, 3]
    # sigmas laid out as FlowMatchHeunDiscreteScheduler lays out its own: one per evaluation, then 0
    torch.testing.assert_close(scheduler.solver_sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert scheduler.sigmas.tolist() == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]
    heun = FlowMatchHeunDiscreteScheduler()
    heun.set_timesteps(4)
    assert len(heun.sigmas) == len(scheduler.sigmas) and len(heun.timesteps) == len(scheduler.timesteps)
    assert heun.sigmas[1] == heun.sigmas[2] and heun.sigmas[-1] == 0


def test_matches_diffusers_multistep_schedulers_on_the_same_karras_walk():
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def diffusers_run(scheduler):
        scheduler.set_timesteps(6)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(_smooth_model(x), t, x).prev_sample
        return x

    pairs = [(DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD_BETAS), "dpmpp_2m"),
             (UniPCMultistepScheduler(use_karras_sigmas=True, **SD_BETAS), "unipc_bh2")]
    for theirs, ours in pairs:
        expected = diffusers_run(theirs)
        got = _run_scheduler(AccelScheduler(solver=ours, prediction_type="epsilon", **SD_BETAS), noise, 6)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    scheduler = AccelScheduler(solver="ddim", schedule="logsnr", prediction_type="v_prediction",
                               solver_options={"eta": 0.5}, schedule_options={"sigma_min": 0.05})
    scheduler.save_pretrained(tmp_path)
    loaded = AccelScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps)
    assert float(loaded.solver_sigmas[-2]) == pytest.approx(0.05)


def test_from_config_of_diffusers_schedulers_keeps_the_model_settings():
    flow = AccelScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="heun")
    assert flow.prediction == "flow" and flow.schedule_name == "flow"
    flow.set_timesteps(4)
    torch.testing.assert_close(flow.solver_sigmas, samplers.get_sigmas_flow(4, shift=3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vp = AccelScheduler.from_config(DDIMScheduler().config, solver="unipc_bh1")
        sd15 = AccelScheduler.from_config({"_class_name": "PNDMScheduler", **SD_BETAS})
    assert vp.prediction == "epsilon" and vp.schedule_name == "karras"
    assert vp.config.beta_schedule == "linear" and vp.config.beta_start == 0.0001  # DDIM's defaults kept
    assert sd15.prediction == "epsilon" and sd15.config.beta_schedule == "scaled_linear"


def test_ddim_eta_in_a_scheduler_uses_the_step_generator():
    def run(seed):
        scheduler = AccelScheduler(solver="ddim", prediction_type="epsilon", solver_options={"eta": 1.0})
        scheduler.set_timesteps(4)
        x, generator = torch.ones(1, 3), torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            x = scheduler.step(_smooth_model(x), t, x, generator=generator).prev_sample
        return x

    torch.testing.assert_close(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


# ---------------------------------------------------------------- tiny pipelines, built offline


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16)


def _record_contexts(module: torch.nn.Module) -> list:
    seen = []
    module.register_forward_pre_hook(lambda *_: seen.append(current_step()))
    return seen


def _embeds(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


@pytest.mark.parametrize("solver", ["heun", "unipc_bh2"])
def test_tiny_flux_pipeline_runs_with_the_scheduler(solver):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    seen = _record_contexts(transformer)
    scheduler = AccelScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, solver=solver)
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=_embeds(1, 5, 16), pooled_prompt_embeds=_embeds(1, 8), height=16, width=16,
               num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 16) and torch.isfinite(out).all()
    assert len(seen) == SOLVERS[solver].nfe(4) == len(scheduler.timesteps)
    assert scheduler.schedule_name == "flux" and seen[0].sigma == 1.0 and seen[-1].step_index == 3
    mu = samplers.flux_mu(64)
    torch.testing.assert_close(scheduler.solver_sigmas, samplers.get_sigmas_flux(4, mu=mu))
    assert current_step() is None


def test_tiny_flux_pipeline_euler_reproduces_flow_match_euler():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    outs = []
    for scheduler in (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                      AccelScheduler(solver="euler", use_dynamic_shifting=True)):
        pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(), text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(prompt_embeds=_embeds(1, 5, 16), pooled_prompt_embeds=_embeds(1, 8), height=16,
                         width=16, num_inference_steps=5, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_tiny_sd3_pipeline_runs_with_the_scheduler():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    seen = _record_contexts(transformer)
    scheduler = AccelScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="dpmpp_3m")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=_tiny_vae(),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=_embeds(1, 5, 16), pooled_prompt_embeds=_embeds(1, 8),
               negative_prompt_embeds=_embeds(1, 5, 16), negative_pooled_prompt_embeds=_embeds(1, 8),
               height=16, width=16, num_inference_steps=4, guidance_scale=2.0, output_type="latent").images
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert [c.step_index for c in seen] == [0, 1, 2, 3]  # cond and uncond batched into one call
    torch.testing.assert_close(scheduler.solver_sigmas, samplers.get_sigmas_flow(4, shift=3.0))


@pytest.mark.parametrize("solver, options", [("unipc_bh1", None), ("ddim", {"eta": 0.5})])
def test_tiny_stable_diffusion_pipeline_runs_with_the_scheduler(solver, options):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    seen = _record_contexts(unet)
    scheduler = AccelScheduler(solver=solver, prediction_type="epsilon", solver_options=options, **SD_BETAS)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=_embeds(1, 5, 16), negative_prompt_embeds=_embeds(1, 5, 16), height=16, width=16,
               num_inference_steps=4, guidance_scale=2.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert [c.step_index for c in seen] == [0, 1, 2, 3]
    assert seen[0].timestep == pytest.approx(999.0, abs=0.01) and seen[0].solver_order == SOLVERS[solver].order
