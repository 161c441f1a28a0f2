"""The Denoiser contract: the parameterisation adapters against closed-form values."""

import pytest
import torch

import samplers
from samplers.denoiser import eps_to_x0, v_to_x0, velocity_to_x0, x0_to_eps, x0_to_velocity


def _sample():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 3, 3, generator=generator)
    eps = torch.randn(4, 1, 3, 3, generator=generator)
    return x0, eps


def test_flow_velocity_adapters_recover_x0_and_velocity():
    x0, eps = _sample()
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    x = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    velocity = eps - x0
    torch.testing.assert_close(velocity_to_x0(velocity, x, t), x0)
    torch.testing.assert_close(x0_to_velocity(x0, x, t), velocity)


def test_eps_and_v_adapters_on_a_vp_schedule():
    x0, eps = _sample()
    sigma_ve = torch.tensor([0.05, 0.5, 2.0, 30.0])
    alpha, s = samplers.VPSchedule(torch.linspace(0.999, 0.01, 1000)).alpha_sigma(sigma_ve)
    torch.testing.assert_close(alpha**2 + s**2, torch.ones(4))
    x = alpha[:, None, None, None] * x0 + s[:, None, None, None] * eps
    torch.testing.assert_close(eps_to_x0(eps, x, alpha, s), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_to_eps(x0, x, alpha, s), eps, atol=1e-4, rtol=1e-4)
    v = alpha[:, None, None, None] * eps - s[:, None, None, None] * x0
    torch.testing.assert_close(v_to_x0(v, x, alpha, s), x0, atol=1e-5, rtol=1e-5)


def test_denoiser_converts_every_parameterisation_to_the_same_x0():
    x0, eps = _sample()
    sigma = torch.full((4,), 0.3)
    x = 0.7 * x0 + 0.3 * eps
    flow = samplers.Denoiser(lambda x, s: eps - x0, prediction_type="flow")
    direct = samplers.Denoiser(lambda x, s: x0, prediction_type="x0")
    torch.testing.assert_close(flow(x, sigma), x0)
    torch.testing.assert_close(direct(x, 0.3), x0)


def test_denoiser_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        samplers.Denoiser(lambda x, s: x, prediction_type="sample")


def test_vp_sigma_to_timestep_inverts_training_sigmas():
    schedule = samplers.VPSchedule(torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64))
    timesteps = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    sigmas = schedule.train_sigmas[timesteps.long()]
    torch.testing.assert_close(schedule.sigma_to_timestep(sigmas), timesteps)
