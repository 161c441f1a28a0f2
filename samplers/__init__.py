"""Few-step solvers and schedules. Knows nothing of caches or training.

Every solver is a short pure function `sample_x(denoiser, x, sigmas, *, cond, callback)` over a
Denoiser (contract 1); schedules are separate `get_sigmas_*` functions.
"""

from samplers.denoiser import (PREDICTION_TYPES, Denoiser, FlowSchedule, VPSchedule, eps_to_x0,
                               prediction_to_x0, v_to_x0, velocity_to_x0, x0_to_eps, x0_to_velocity)
from samplers.euler import sample_euler
from samplers.guidance import cfg_model_fn
from samplers.registry import SCHEDULES, SOLVERS, SolverSpec, get_schedule, get_solver
from samplers.schedules import get_sigmas_flow, shift_time

__all__ = ["PREDICTION_TYPES", "Denoiser", "FlowSchedule", "VPSchedule", "eps_to_x0", "prediction_to_x0",
           "v_to_x0", "velocity_to_x0", "x0_to_eps", "x0_to_velocity", "sample_euler", "cfg_model_fn",
           "SCHEDULES", "SOLVERS", "SolverSpec", "get_schedule", "get_solver", "get_sigmas_flow", "shift_time"]
