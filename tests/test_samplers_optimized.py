"""optimize_schedule: exact reuse of shared model calls, the objective and the penalty toward the start."""

import pytest
import torch

import samplers
from samplers import FlowSchedule
from samplers.optimized import optimize_schedule

MEAN, STD = 0.7, 0.3


class CountingGaussian(samplers.Denoiser):
    """The exact denoiser of N(MEAN, STD^2) data on a flow schedule, counting its calls."""

    def __init__(self):
        super().__init__(self._x0, "x0", FlowSchedule())
        self.calls = 0

    def _x0(self, x, sigma, **_):
        self.calls += 1
        alpha, s = self.schedule.alpha_sigma(sigma.double())
        alpha, s = alpha.view(-1, 1), s.view(-1, 1)
        return MEAN + alpha * STD**2 / (alpha**2 * STD**2 + s**2) * (x - alpha * MEAN)


def _noise():
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _reference(denoiser, noise):
    return samplers.sample(denoiser, noise, solver="heun", steps=60, schedule="flow")


def test_shared_model_calls_are_reused_exactly():
    denoiser, noise = CountingGaussian(), _noise()
    reference = _reference(denoiser, noise)
    denoiser.calls = 0
    found = optimize_schedule(denoiser, "dpmpp_2m", 6, noise, reference=reference, sweeps=1, iterations=3)
    runs, made = found.reference["evaluations"], found.reference["model_calls"]
    assert denoiser.calls == made and made < 0.6 * runs * 6  # every run is 6 calls without reuse
    out = samplers.sample_dpmpp_2m(denoiser, noise, torch.tensor(found.sigmas))  # no cache in between
    assert float((out - reference).pow(2).mean()) == pytest.approx(found.error, rel=1e-12)
    assert found.error < found.initial_error


def test_the_penalty_keeps_the_walk_near_its_start():
    denoiser, noise = CountingGaussian(), _noise()
    reference = _reference(denoiser, noise)
    start = samplers.make_sigmas("flow", 4, denoiser.schedule).tolist()
    free = optimize_schedule(denoiser, "euler", 4, noise, reference=reference, sweeps=1, iterations=3)
    priced = optimize_schedule(denoiser, "euler", 4, noise, reference=reference, sweeps=1, iterations=3,
                               penalty=1e6)
    moved = lambda found: max(abs(a - b) for a, b in zip(found.sigmas, start))  # noqa: E731
    assert moved(free) > 0.02 and priced.sigmas == start and priced.error == priced.initial_error
    assert priced.reference["penalty"] == 1e6 and free.reference["objective"] == "psnr"


@pytest.mark.parametrize("objective", ["psnr", "mse"])
def test_both_objectives_improve_their_own_measure(objective):
    denoiser, noise = CountingGaussian(), _noise()
    reference = _reference(denoiser, noise)
    found = optimize_schedule(denoiser, "euler", 4, noise, reference=reference, sweeps=1, iterations=3,
                              objective=objective)

    def per_sample(sigmas):
        out = samplers.sample_euler(denoiser, noise, torch.tensor(sigmas, dtype=torch.float64))
        return (out - reference).pow(2).mean(1)
    before, after = per_sample(samplers.make_sigmas("flow", 4, denoiser.schedule).tolist()), per_sample(found.sigmas)
    if objective == "psnr":
        assert after.log().mean() < before.log().mean() - 0.1
        assert found.reference["objective_value"] == pytest.approx(float(after.log().mean()), rel=1e-9)
    else:
        assert after.mean() < 0.9 * before.mean()
        assert found.reference["objective_value"] == pytest.approx(float(after.mean().log()), rel=1e-9)


def test_bad_search_settings_are_refused():
    denoiser, noise = CountingGaussian(), _noise()
    with pytest.raises(ValueError, match="objective must be one of"):
        optimize_schedule(denoiser, "euler", 4, noise, reference=noise, objective="ssim")
    with pytest.raises(ValueError, match="penalty must be >= 0"):
        optimize_schedule(denoiser, "euler", 4, noise, reference=noise, penalty=-1.0)
