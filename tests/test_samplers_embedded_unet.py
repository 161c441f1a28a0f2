"""The embedded epsilon UNet's wrapper: a Denoiser for the native solvers and the drop-in scheduler."""

import pytest
import torch

import samplers
from accel.embedded.unet import UNetDigits, build_unet_digits, load_unet_digits
from samplers.diffusers_scheduler import AccelScheduler

TINY = dict(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def model() -> UNetDigits:
    return build_unet_digits(seed=0, **TINY).eval()


def test_epsilon_takes_ve_sigma_and_maps_it_to_the_ddpm_timestep(model):
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[1]), with_kwargs=True)
    x = torch.randn(2, 1, 16, 16)
    sigma = model.noise_schedule.train_sigmas[[999, 500]]
    with torch.no_grad():
        assert model.epsilon(x, sigma, torch.tensor([3, 10])).shape == (2, 1, 16, 16)
    torch.testing.assert_close(seen[-1], torch.tensor([999.0, 500.0]), atol=1e-3, rtol=0)


def test_native_sampling_and_the_scheduler_agree_on_the_unet(model):
    labels = torch.tensor([1, 7])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    native = samplers.sample(model.denoiser(guidance_scale=1.0), noise, solver="dpmpp_2m", steps=4,
                             cond={"labels": labels})
    scheduler = AccelScheduler(solver="dpmpp_2m", prediction_type="epsilon", **model.betas)
    scheduler.set_timesteps(4)
    x = noise * float(model.noise_schedule.alpha_sigma(scheduler.sigmas[0])[1])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model.unet(x, t, class_labels=labels).sample, t, x).prev_sample
    torch.testing.assert_close(x, native, rtol=1e-4, atol=1e-4)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = load_unet_digits(tmp_path)
    assert loaded.betas == model.betas
    torch.testing.assert_close(loaded.noise_schedule.alphas_cumprod, model.noise_schedule.alphas_cumprod)
    x, sigma, labels = torch.randn(1, 1, 16, 16), torch.tensor([2.0]), torch.tensor([4])
    with torch.no_grad():
        torch.testing.assert_close(loaded.epsilon(x, sigma, labels), model.epsilon(x, sigma, labels))
    with pytest.raises(FileNotFoundError, match="train_embedded_unet.py"):
        load_unet_digits(tmp_path / "missing")


# ------------------------------------------------------------------ the UNet as a diffusers pipeline


@pytest.fixture(scope="module")
def pipeline_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet-pipeline")
    model.save_pretrained(folder)
    return folder


def _lab_model(folder):
    from omegaconf import OmegaConf

    from accel.lab.models import load_model

    return load_model(OmegaConf.create({"name": str(folder)}))


def test_the_saved_folder_loads_as_the_embedded_unet_pipeline(pipeline_folder):
    from diffusers import DDIMScheduler

    from accel.branch_hook import branch_mode
    from accel.embedded.unet_pipeline import UNetDigitsPipeline

    loaded = _lab_model(pipeline_folder)
    assert type(loaded.pipe) is UNetDigitsPipeline and loaded.is_embedded and loaded.denoiser_name == "unet"
    assert type(loaded.pipe.scheduler) is DDIMScheduler
    assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"
    assert branch_mode(UNetDigitsPipeline) == "ordered"  # cond then uncond, two calls per step
    assert load_unet_digits(pipeline_folder).betas == build_unet_digits().betas


@pytest.mark.parametrize("solver,schedule", [("unipc_bh2", "karras"), ("dpmpp_2m", "logsnr"), ("heun", "timestep")])
def test_the_pipeline_through_accel_apply_equals_the_native_sampler(pipeline_folder, solver, schedule):
    import accel
    from accel.stack import GuidancePlan, SamplerPlan, Stack

    pipe = _lab_model(pipeline_folder).pipe
    unet = UNetDigits(unet=pipe.unet)
    denoiser = unet.denoiser(guidance_scale=3.0)
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 9])
    native = samplers.sample(denoiser, noise, solver=solver, steps=4, schedule=schedule, cond={"labels": labels})
    start = float(denoiser.alpha_sigma(samplers.make_sigmas(schedule, 4, denoiser.schedule)[0].double())[1])
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    accel.apply(pipe, Stack(SamplerPlan(solver, 4, schedule), guidance=GuidancePlan(3.0)))
    try:  # the native loop starts at s(sigma_0) * noise; the pipeline takes those latents as given
        images = pipe(class_labels=labels.tolist(), num_inference_steps=4, guidance_scale=3.0,
                      latents=noise * start, output_type="latent").images
    finally:
        accel.remove(pipe)
    torch.testing.assert_close(images, native, rtol=0, atol=1e-6)
    assert len(calls) == 2 * samplers.get_solver(solver).nfe(4)


def test_the_pipeline_with_its_own_scheduler_is_the_diffusers_ddim_loop(pipeline_folder):
    from diffusers import DDIMScheduler

    pipe = _lab_model(pipeline_folder).pipe
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    images = pipe(class_labels=[2, 3], num_inference_steps=5, guidance_scale=1.0, generator=generators,
                  output_type="latent").images
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(5)
    x = torch.cat([torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t.float().expand(2), class_labels=torch.tensor([2, 3])).sample, t,
                               x).prev_sample
    assert scheduler.timesteps[0] == 999  # trailing: the walk starts at pure noise
    torch.testing.assert_close(images, x, rtol=0, atol=0)


def test_recipes_know_the_unet_is_a_vp_model():
    from accel.recipe import load_recipe
    from accel.recipe.load import RecipeError

    recipe = load_recipe("embedded-demo", ["model.name=unet-digits", "sampler.schedule=karras",
                                           "eval.reference.schedule=karras", "guidance.scale=3.0"])
    assert recipe.model.name == "unet-digits"
    with pytest.raises(RecipeError, match="schedule"):
        load_recipe("embedded-demo", ["model.name=unet-digits", "sampler.schedule=karras"])  # reference on flow
