"""Dynamic compensation (samplers.compensation): identity at zero, closed-form extrapolation, the
optimised-schedule file carrying its ratios to samplers.sample and AccelScheduler, bad input."""

import pytest
import torch

import samplers
from samplers import FlowSchedule, OptimizedSchedule
from samplers.diffusers_scheduler import AccelScheduler
from samplers.optimized import optimize_schedule

A, B = 0.3, 2.0


def _linear_x0() -> samplers.Denoiser:
    """x0(x, t) = A + B t: a prediction that lags linearly with the noise level."""
    return samplers.Denoiser(lambda x, sigma: A + B * sigma.view(-1, 1) + 0 * x, "x0", FlowSchedule())


def _smooth_model(x: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.1 * torch.tanh(2 * x)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc_bh2", "heun"])
def test_zero_ratios_change_nothing(solver):
    denoiser = samplers.Denoiser(lambda x, s: _smooth_model(x), "flow", FlowSchedule())
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    plain = samplers.sample(denoiser, noise, solver=solver, steps=5, schedule="flow")
    zero = samplers.sample(denoiser, noise, solver=solver, steps=5, schedule="flow",
                           solver_options={"compensation": [0.0] * 5})
    assert torch.equal(plain, zero)


def test_the_last_ratio_extrapolates_a_linear_prediction_to_zero_noise():
    # Euler's last step to t = 0 returns the x0 it is fed: A + B t_last plainly, and exactly A with
    # rho = t_last / (t_prev - t_last), the two-point extrapolation to t = 0.
    noise = torch.zeros(2, 1)
    sigmas = samplers.make_sigmas("flow", 4, FlowSchedule())  # 1, 0.75, 0.5, 0.25, 0
    plain = samplers.sample(_linear_x0(), noise, solver="euler", steps=4, schedule="flow")
    assert torch.allclose(plain, torch.full_like(plain, A + B * 0.25))
    ratio = float(sigmas[3] / (sigmas[2] - sigmas[3]))
    out = samplers.sample(_linear_x0(), noise, solver="euler", steps=4, schedule="flow",
                          solver_options={"compensation": [0.0, 0.0, 0.0, ratio]})
    assert torch.allclose(out, torch.full_like(out, A), atol=1e-6)


def test_an_optimised_file_brings_its_ratios_to_sample_and_to_the_scheduler(tmp_path):
    denoiser = samplers.Denoiser(lambda x, s: _smooth_model(x), "flow", FlowSchedule())
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    sigmas = samplers.make_sigmas("flow", 5, FlowSchedule(), shift=2.0)
    ratios = [0.0, 0.2, -0.1, 0.05, 0.3]
    path = OptimizedSchedule(sigmas.tolist(), "unipc_bh2", 5, "flow", 0.0, 0.0, "flow",
                             solver_options={"compensation": ratios}).save(tmp_path / "walk.json")
    stored = samplers.sample(denoiser, noise, solver="unipc_bh2", steps=5, schedule="optimized",
                             schedule_options={"path": str(path)})
    def with_ratios(values):  # explicit solver options win over the file's
        return samplers.sample(denoiser, noise, solver="unipc_bh2", steps=5, schedule="optimized",
                               schedule_options={"path": str(path)}, solver_options={"compensation": values})

    assert torch.equal(stored, with_ratios(ratios)) and not torch.allclose(stored, with_ratios([0.0] * 5))
    scheduler = AccelScheduler(solver="unipc_bh2", schedule="optimized", prediction_type="flow",
                               schedule_options={"path": str(path)})
    scheduler.set_timesteps(5)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(_smooth_model(x), t, x).prev_sample
    torch.testing.assert_close(x, stored, rtol=1e-5, atol=1e-5)


def test_wrong_ratio_counts_are_refused_with_the_fix():
    denoiser = _linear_x0()
    with pytest.raises(ValueError, match="has 3 ratios but the walk has 4 steps; give one ratio per step"):
        samplers.sample(denoiser, torch.zeros(1, 1), solver="euler", steps=4, solver_options={"compensation": [0.0] * 3})


def test_calibrated_ratios_lower_the_calibration_error():
    denoiser = _linear_x0()
    noise = torch.zeros(4, 1, dtype=torch.float64)
    reference = torch.full_like(noise, A)
    found = optimize_schedule(denoiser, "euler", 4, noise, reference=reference, sweeps=1, iterations=3,
                              penalty=1e6, compensation=True, compensation_penalty=0.0, compensation_width=4.0,
                              compensation_iterations=12)
    ratios = found.solver_options["compensation"]
    assert len(ratios) == 4 and ratios[0] == 0.0 and found.reference["compensation"] is True
    assert found.error < 1e-3 * found.initial_error  # the linear lag is removed almost exactly
