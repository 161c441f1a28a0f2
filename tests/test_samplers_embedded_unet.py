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
