"""Schedules: shape and order, agreement with diffusers' own spacing, and the optimised schedule."""

import json
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import samplers
from samplers import SCHEDULES, FlowSchedule
from samplers.optimized import optimize_schedule

VP = samplers.vp_schedule_from_betas()


def _model_schedule(spec):
    return FlowSchedule() if spec.family == "flow" else VP


@pytest.mark.parametrize("name", sorted(set(SCHEDULES) - {"optimized"}))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_every_schedule_is_a_decreasing_cpu_walk_ending_in_zero(name, steps):
    spec = SCHEDULES[name]
    sigmas = spec.sigmas(steps, _model_schedule(spec))
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
    assert float(sigmas[-1]) == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_flux_dynamic_shift_matches_diffusers():
    steps, image_seq_len = 6, 1024
    mu = samplers.flux_mu(image_seq_len)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).numpy(), mu=mu)
    torch.testing.assert_close(samplers.get_sigmas_flux(steps, image_seq_len=image_seq_len), reference.sigmas)
    torch.testing.assert_close(samplers.get_sigmas_flux(steps, mu=mu), reference.sigmas)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))


def test_sd3_static_shift_matches_diffusers_on_the_same_uniform_times():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=torch.linspace(1, 1 / 8, 8).numpy())
    torch.testing.assert_close(samplers.get_sigmas_sd3(8), reference.sigmas)


def test_vp_karras_matches_diffusers_and_spans_the_trained_range():
    reference = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012, use_karras_sigmas=True)
    reference.set_timesteps(10)
    sigmas = samplers.get_sigmas_vp_karras(10, VP)
    torch.testing.assert_close(sigmas, reference.sigmas.float(), rtol=1e-4, atol=1e-6)
    assert float(sigmas[0]) == pytest.approx(float(VP.train_sigmas[-1]))
    assert float(sigmas[-2]) == pytest.approx(float(VP.train_sigmas[0]))


def test_log_snr_schedules_have_equal_log_snr_steps():
    flow = samplers.get_sigmas_flow_logsnr(5).double()[:-1]
    vp = samplers.get_sigmas_vp_logsnr(5, VP).double()[:-1]
    for lam in (torch.log((1 - flow) / flow), -torch.log(vp)):
        gaps = lam.diff()
        torch.testing.assert_close(gaps, gaps[:1].expand_as(gaps), rtol=1e-4, atol=1e-4)


def test_flow_karras_has_the_log_snr_of_ve_karras():
    ve = samplers.get_sigmas_karras(6, 0.002, 80.0).double()
    torch.testing.assert_close(samplers.get_sigmas_flow_karras(6).double(), ve / (1 + ve), rtol=1e-6, atol=1e-7)


def test_vp_timestep_schedule_is_uniform_trailing_timesteps():
    sigmas = samplers.get_sigmas_vp_timestep(4, VP)
    timesteps = VP.sigma_to_timestep(sigmas[:-1])
    torch.testing.assert_close(timesteps, torch.tensor([999.0, 749.0, 499.0, 249.0]), atol=1e-2, rtol=0)


def test_cosine_betas_give_a_valid_vp_schedule():
    cosine = samplers.vp_schedule_from_betas(beta_schedule="squaredcos_cap_v2")
    assert bool((cosine.train_sigmas.diff() > 0).all())
    assert samplers.get_sigmas_vp_karras(4, cosine).isfinite().all()


def _gaussian(schedule, mean=0.7, std=0.3):
    def model_fn(x, sigma, **_):
        alpha, s = schedule.alpha_sigma(sigma.double())
        alpha, s = alpha.view(-1, 1), s.view(-1, 1)
        return mean + alpha * std**2 / (alpha**2 * std**2 + s**2) * (x - alpha * mean)
    return samplers.Denoiser(model_fn, "x0", schedule)


@pytest.mark.parametrize("family", ["flow", "vp"])
def test_optimised_schedule_beats_its_start_and_round_trips_through_json(family, tmp_path):
    schedule = FlowSchedule() if family == "flow" else VP
    denoiser = _gaussian(schedule)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    found = optimize_schedule(denoiser, "dpmpp_2m", 4, noise, reference_steps=60, sweeps=2, iterations=5)
    assert found.num_steps == 4 and found.error < 0.7 * found.initial_error
    sigmas = found.tensor()
    assert sigmas[0] == samplers.make_sigmas("auto", 4, schedule)[0] and sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    path = found.save(tmp_path / "schedule.json")
    assert json.loads(path.read_text())["solver"] == "dpmpp_2m"
    assert samplers.OptimizedSchedule.load(path) == found
    loaded = SCHEDULES["optimized"].sigmas(4, schedule, path=path, solver="dpmpp_2m")
    torch.testing.assert_close(loaded, sigmas)
    with pytest.raises(ValueError, match="optimised for 4 steps, not 5"):
        SCHEDULES["optimized"].sigmas(5, schedule, path=path)
    with pytest.raises(ValueError, match="optimised for solver 'dpmpp_2m', not 'euler'"):
        SCHEDULES["optimized"].sigmas(4, schedule, path=path, solver="euler")
    other = VP if family == "flow" else FlowSchedule()
    with pytest.raises(ValueError, match="optimise a schedule for this model"):
        SCHEDULES["optimized"].sigmas(4, other, path=path)


def test_optimiser_refuses_an_nfe_budget_the_solver_cannot_meet():
    with pytest.raises(ValueError, match="cannot spend exactly 4 evaluations.*use nfe=3 or 5"):
        optimize_schedule(_gaussian(FlowSchedule()), "heun", 4, torch.zeros(2, 4))


def test_a_missing_schedule_file_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="optimize_schedule"):
        samplers.get_sigmas_optimized(4, FlowSchedule(), path=tmp_path / "missing.json")
    assert math.isfinite(float(samplers.get_sigmas_flow(3)[1]))
