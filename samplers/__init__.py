"""Few-step solvers and schedules. Knows nothing of caches or training.

Every solver is a short pure function `sample_x(denoiser, x, sigmas, *, cond, callback)` over a
Denoiser (the Denoiser contract, docs/architecture.md), built on a generator core shared with the diffusers-compatible scheduler
(`samplers.diffusers_scheduler.AccelScheduler`); schedules are separate `get_sigmas_*` functions.
"""

from samplers.api import make_sigmas, resolve_steps, sample
from samplers.denoiser import (PREDICTION_TYPES, Denoiser, FlowSchedule, VPSchedule, eps_to_x0,
                               prediction_to_x0, v_to_x0, velocity_to_x0, x0_to_eps, x0_to_velocity)
from samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2s, sample_dpmpp_3m
from samplers.euler import sample_ddim, sample_euler
from samplers.guidance import cfg_model_fn
from samplers.ipndm import sample_ipndm
from samplers.registry import (SCHEDULES, SOLVERS, ScheduleSpec, SolverSpec, check_prediction, get_schedule,
                               get_solver)
from samplers.rk import sample_heun, sample_midpoint
from samplers.schedules import (OptimizedSchedule, flux_mu, get_sigmas_flow, get_sigmas_flow_karras,
                                get_sigmas_flow_logsnr, get_sigmas_flux, get_sigmas_karras, get_sigmas_logsnr,
                                get_sigmas_optimized, get_sigmas_sd3, get_sigmas_vp_karras,
                                get_sigmas_vp_logsnr, get_sigmas_vp_timestep, shift_time,
                                vp_schedule_from_betas)
from samplers.unipc import sample_unipc, sample_unipc_bh1, sample_unipc_bh2

__all__ = ["PREDICTION_TYPES", "Denoiser", "FlowSchedule", "VPSchedule", "eps_to_x0", "prediction_to_x0",
           "v_to_x0", "velocity_to_x0", "x0_to_eps", "x0_to_velocity", "cfg_model_fn",
           "sample", "make_sigmas", "resolve_steps",
           "sample_euler", "sample_ddim", "sample_heun", "sample_midpoint", "sample_dpmpp_2m",
           "sample_dpmpp_3m", "sample_dpmpp_2s", "sample_unipc", "sample_unipc_bh1", "sample_unipc_bh2",
           "sample_ipndm", "SCHEDULES", "SOLVERS", "ScheduleSpec", "SolverSpec", "check_prediction",
           "get_schedule", "get_solver", "OptimizedSchedule", "flux_mu", "get_sigmas_flow",
           "get_sigmas_flow_karras", "get_sigmas_flow_logsnr", "get_sigmas_flux", "get_sigmas_karras",
           "get_sigmas_logsnr", "get_sigmas_optimized", "get_sigmas_sd3", "get_sigmas_vp_karras",
           "get_sigmas_vp_logsnr", "get_sigmas_vp_timestep", "shift_time", "vp_schedule_from_betas"]
