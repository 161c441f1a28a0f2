"""Bad input gets a one-line ValueError that names the fix."""

import pytest
import torch

import samplers
from samplers import Denoiser, FlowSchedule, SolverSpec
from samplers.diffusers_scheduler import AccelScheduler

VP = samplers.vp_schedule_from_betas()
FLOW = Denoiser(lambda x, s: torch.zeros_like(x), "flow")


def _raises(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_fewer_than_one_step(steps):
    _raises("integer >= 1", samplers.get_sigmas_flow, steps)
    _raises("integer >= 1", samplers.get_sigmas_vp_karras, steps, VP)
    _raises("at least one step|integer >= 1", samplers.sample, FLOW, torch.zeros(1, 2), steps=steps)
    _raises("integer >= 1", AccelScheduler().set_timesteps, steps)


def test_unknown_solver_and_schedule_names_list_the_known_ones():
    _raises("unknown solver 'dpm'; choose one of: ddim, dpmpp_2m", samplers.get_solver, "dpm")
    _raises("unknown schedule 'cosine'; choose one of: flow, flow_karras", samplers.get_schedule, "cosine")
    _raises("unknown solver", AccelScheduler, solver="dpm")
    _raises("unknown schedule", AccelScheduler, schedule="cosine")
    _raises("unknown solver", samplers.sample, FLOW, torch.zeros(1, 2), solver="dpm", steps=2)
    _raises("unknown prediction_type 'noise'; use one of", AccelScheduler, prediction_type="noise")


def test_a_solver_or_schedule_that_does_not_fit_the_model():
    v_on_flow = Denoiser(lambda x, s: x, "v", FlowSchedule())
    _raises("'v' prediction does not fit a flow noise schedule; use a vp schedule", samplers.sample,
            v_on_flow, torch.zeros(1, 2), steps=2)
    _raises("'epsilon' prediction does not fit a flow noise schedule", AccelScheduler,
            prediction_type="epsilon", noise_schedule="flow")
    flow_only = SolverSpec("flow_only", samplers.sample_euler, samplers.SOLVERS["euler"].steps, order=1,
                           evals_per_step=1, paper="-", predictions=("flow",), families=("flow",))
    _raises("solver 'flow_only' does not fit a 'epsilon' vp model; use one of: euler", flow_only.check_fits,
            "epsilon", "vp")
    _raises("schedule 'karras' is for vp models, this model is flow; use one of: flow", samplers.sample,
            FLOW, torch.zeros(1, 2), steps=2, schedule="karras")
    _raises("schedule 'flux' is for flow models, this model is vp", AccelScheduler, schedule="flux",
            prediction_type="epsilon")
    _raises("takes no option rho; its options are: shift, t_max", samplers.make_sigmas, "flow", 4,
            FlowSchedule(), rho=7.0)


def test_an_nfe_budget_the_solver_cannot_meet():
    _raises("'midpoint' cannot spend exactly 5 evaluations .*use nfe=4 or 6", samplers.sample, FLOW,
            torch.zeros(1, 2), solver="midpoint", nfe=5)
    _raises("'heun' cannot spend exactly 2 evaluations .*use nfe=1 or 3", samplers.SOLVERS["heun"].steps_for_nfe, 2)
    _raises("NFE budget must be an integer >= 1", samplers.SOLVERS["euler"].steps_for_nfe, 0)
    _raises("give exactly one of steps and nfe", samplers.sample, FLOW, torch.zeros(1, 2), steps=2, nfe=2)


def test_bad_walks_and_options_for_a_solver():
    _raises("strictly decreasing", samplers.sample_euler, FLOW, torch.zeros(1, 2), torch.tensor([0.5, 1.0, 0.0]))
    _raises("1-D tensor of num_steps \\+ 1 >= 2 values", samplers.sample_heun, FLOW, torch.zeros(1, 2),
            torch.tensor([1.0]))
    _raises("eta must be >= 0", samplers.sample_ddim, FLOW, torch.zeros(1, 2), samplers.get_sigmas_flow(2), eta=-1)
    _raises("need 0 < min < max", samplers.get_sigmas_karras, 4, 1.0, 0.5)
    _raises("shift must be > 0", samplers.get_sigmas_flow, 4, shift=0.0)


def test_scheduler_misuse():
    scheduler = AccelScheduler(solver="euler")
    _raises("call set_timesteps", scheduler.step, torch.zeros(1, 2), 1000.0, torch.zeros(1, 2))
    scheduler.set_timesteps(1)
    scheduler.step(torch.zeros(1, 2), scheduler.timesteps[0], torch.zeros(1, 2))
    _raises("all 1 timesteps are done; call set_timesteps", scheduler.step, torch.zeros(1, 2), 0.0, torch.zeros(1, 2))
    _raises("begin_index 3 is past the 1 timesteps", scheduler.set_begin_index, 3)
    _raises("begin_index must be an integer >= 0, got -1", scheduler.set_begin_index, -1)
    heun = AccelScheduler(solver="heun")
    heun.set_timesteps(4)
    _raises("solver 'heun' takes 2 model evaluations per step and cannot start mid-walk .*; use one of: euler, ddim",
            heun.set_begin_index, 2)
    _raises("schedule 'auto' walks the pipeline's FlowMatchEulerDiscreteScheduler and takes no schedule options",
            AccelScheduler, native_config={"_class_name": "FlowMatchEulerDiscreteScheduler"},
            schedule_options={"shift": 2.0})
    native = AccelScheduler(native_config={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                           "use_dynamic_shifting": True})
    _raises("FlowMatchEulerDiscreteScheduler.set_timesteps: `mu` must be passed", native.set_timesteps, 4)
