"""iPNDM and DPM-Solver++(3M) variants: their coefficients, convergence orders and references."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import samplers
from samplers import SOLVERS, FlowSchedule
from samplers.diffusers_scheduler import AccelScheduler
from samplers.levels import levels
from samplers.loop import advance, run_solver
from test_samplers_solvers import VP, _noise, _partial_walk, exact_flow_map, gaussian_denoiser

def _rho_uniform_walk(family: str, steps: int) -> torch.Tensor:
    """Steps of equal size in DDIM's rho = s / alpha, from rho = 2 to rho = 0.2."""
    rho = torch.linspace(2.0, 0.2, steps + 1, dtype=torch.float64)
    return rho if family == "vp" else rho / (1 + rho)


def _errors(solver: str, family: str, walk, step_counts, **options) -> list[float]:
    schedule = FlowSchedule() if family == "flow" else VP
    denoiser, x = gaussian_denoiser(schedule), _noise(16, 4)
    errors = []
    for steps in step_counts:
        sigmas = walk(family, steps)
        out = run_solver(SOLVERS[solver].make_steps(x, sigmas, schedule, **options), denoiser, sigmas, order=1)
        errors.append(float((out - exact_flow_map(schedule, x, float(sigmas[0]), float(sigmas[-1]))).abs().max()))
    return errors


def _rate(errors: list[float]) -> float:
    """Observed order over the first and last entry, two doublings apart."""
    return math.log2(errors[0] / errors[-1]) / 2


# ---------------------------------------------------------------- iPNDM


def test_ipndm_steps_are_ddim_with_the_adams_bashforth_combination_of_eps():
    """Drive the core by hand: step k uses eps_hat = sum c_j eps_{k-j} with the constant-step coefficients."""
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)  # does not end at 0
    walk = levels(VP, sigmas)
    x = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    core = SOLVERS["ipndm"].make_steps(x, sigmas, VP)
    request, _ = advance(core, None)
    eps_history, x0s = [], torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coefficients = [[1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24],
                    [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    for index in range(5):
        a, b = walk[index], walk[index + 1]
        current = request.x
        eps_history.insert(0, (current - a.alpha * x0s[index]) / a.s)
        eps_hat = sum(c * eps for c, eps in zip(coefficients[index], eps_history))
        expected = b.alpha * (current - a.s * eps_hat) / a.alpha + b.s * eps_hat
        request, result = advance(core, x0s[index])
        got = result if request is None else request.x
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_ipndm_last_steps_to_zero_are_lower_order():
    """On a walk ending at 0 the last step returns the last x0 (DDIM); the one before is second order."""
    sigmas = samplers.get_sigmas_vp_karras(6, VP).double()
    walk = levels(VP, sigmas)
    x0s = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    core = SOLVERS["ipndm"].make_steps(torch.randn(3, dtype=torch.float64), sigmas, VP)
    request, _ = advance(core, None)
    points = []
    for index in range(6):
        points.append(request.x)
        request, result = advance(core, x0s[index])
    torch.testing.assert_close(result, x0s[-1], rtol=0, atol=0)
    a, b = walk[4], walk[5]
    eps = [(points[i] - walk[i].alpha * x0s[i]) / walk[i].s for i in (4, 3)]
    eps_hat = 1.5 * eps[0] - 0.5 * eps[1]
    torch.testing.assert_close(points[5], b.alpha * (points[4] - a.s * eps_hat) / a.alpha + b.s * eps_hat)
    full = run_solver(SOLVERS["ipndm"].make_steps(points[0], sigmas, VP, lower_order_final=False),
                      gaussian_denoiser(VP), sigmas, order=4)
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("family", ["flow", "vp"])
def test_ipndm_converges_at_its_adams_bashforth_order_on_walks_uniform_in_rho(family):
    """Closed-form Gaussian data, equal steps in rho (the paper's setting), 32 -> 128 steps.

    Measured rates: order 2: 1.8-1.9, order 3: 2.6-2.9, order 4: 3.6-3.9 (the single first-order
    warm-up step caps the asymptotic rate at 2, far beyond these step counts for orders 3 and 4).
    """
    rates, finals = {}, {}
    for order in (2, 3, 4):
        errors = _errors("ipndm", family, _rho_uniform_walk, (32, 64, 128), order=order)
        rates[order], finals[order] = _rate(errors), errors[1]
    assert rates[2] > 1.7 and rates[3] > 2.4 and rates[4] > 3.3, rates
    assert finals[4] < finals[3] / 4 < finals[2] / 16, finals


@pytest.mark.parametrize("family, floor", [("flow", 2.4), ("vp", 3.3)])
def test_ipndm_variable_coefficients_keep_the_order_on_non_uniform_walks(family, floor):
    """On walks uniform in t (flow) or log sigma (VP) the constant coefficients are second order
    (measured 2.0); the variable-step weights keep 2.7 (flow) and 3.8 (VP) over 32 -> 128 steps."""
    fixed = _rate(_errors("ipndm", family, _partial_walk, (32, 64, 128)))
    variable = _rate(_errors("ipndm", family, _partial_walk, (32, 64, 128), coefficients="variable"))
    assert 1.8 < fixed < 2.3 and variable > floor, (fixed, variable)


def test_ipndm_rejects_unknown_options():
    with pytest.raises(ValueError, match="coefficients"):
        samplers.sample_ipndm(gaussian_denoiser(VP), _noise(2, 2), samplers.get_sigmas_vp_karras(4, VP),
                              coefficients="adaptive")
    with pytest.raises(ValueError, match="order must be 1 to 4"):
        samplers.sample_ipndm(gaussian_denoiser(VP), _noise(2, 2), samplers.get_sigmas_vp_karras(4, VP), order=5)


# ---------------------------------------------------------------- DPM-Solver++(3M)


@pytest.mark.parametrize("family, counts, floor", [("flow", (64, 128, 256), 2.7), ("vp", (32, 64, 128), 3.2)])
def test_dpmpp_3m_exact_curvature_is_third_order_and_the_default_half_weight_second(family, counts, floor):
    """Gaussian data: exact weight 2.9 (flow) / 3.4 (VP) measured, half weight 1.5 / 2.2 at the same counts
    (its rate tends to 2 from below on the flow walk: 1.9 at 512 steps)."""
    exact = _errors("dpmpp_3m", family, _partial_walk, counts, curvature="exact")
    half = _errors("dpmpp_3m", family, _partial_walk, counts)
    assert _rate(exact) > floor and 1.3 < _rate(half) < 2.4, (exact, half)
    assert exact[-1] < half[-1] / 2.5


@pytest.mark.parametrize("steps", [6, 10])
def test_dpmpp_3m_default_matches_diffusers_third_order_multistep(steps):
    """The half weight is what DPMSolverMultistepScheduler(solver_order=3) computes (lower-order final steps
    below 15 steps on both sides); the exact weight differs from it."""
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def run(scheduler):
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(0.9 * x + 0.1 * torch.tanh(2 * x), t, x).prev_sample
        return x

    theirs = run(DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3, **betas))
    ours = run(AccelScheduler(solver="dpmpp_3m", prediction_type="epsilon", **betas))
    exact = run(AccelScheduler(solver="dpmpp_3m", prediction_type="epsilon", solver_options={"curvature": "exact"},
                               **betas))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (exact - theirs).abs().max() > 1e-3


def test_dpmpp_rejects_an_unknown_curvature():
    with pytest.raises(ValueError, match="curvature"):
        samplers.sample_dpmpp_3m(gaussian_denoiser(VP), _noise(2, 2), samplers.get_sigmas_vp_karras(4, VP),
                                 curvature="full")
