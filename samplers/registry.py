"""Registries of solvers and schedules, chosen by name (recipes never import dotted paths)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from samplers.denoiser import PREDICTION_TYPES
from samplers.dpmpp import (dpmpp_2s_steps, dpmpp_multistep_steps, sample_dpmpp_2m, sample_dpmpp_2s,
                            sample_dpmpp_3m)
from samplers.euler import ddim_steps, euler_steps, sample_ddim, sample_euler
from samplers.ipndm import ipndm_steps, sample_ipndm
from samplers.loop import SolverSteps
from samplers.rk import heun_steps, midpoint_steps, sample_heun, sample_midpoint
from samplers.schedules import (get_sigmas_flow, get_sigmas_flow_karras, get_sigmas_flow_logsnr,
                                get_sigmas_flux, get_sigmas_optimized, get_sigmas_sd3, get_sigmas_vp_karras,
                                get_sigmas_vp_logsnr, get_sigmas_vp_timestep)
from samplers.unipc import sample_unipc_bh1, sample_unipc_bh2, unipc_steps

FAMILIES = ("flow", "vp")
# Raw predictions that convert to x0 everywhere on a family's walk: epsilon needs alpha > 0 (not
# flow t = 1) and v assumes alpha^2 + s^2 = 1, so both are VP-only; flow velocity needs a flow model.
PREDICTIONS_BY_FAMILY = {"flow": ("flow", "x0"), "vp": ("epsilon", "v", "x0")}


def check_prediction(prediction_type: str, family: str) -> None:
    """Raises ValueError if a model's prediction type cannot be sampled on its noise schedule family."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if family not in FAMILIES:
        raise ValueError(f"unknown noise schedule family {family!r}; expected one of {FAMILIES}")
    if prediction_type not in PREDICTIONS_BY_FAMILY[family]:
        fits = [name for name, types in PREDICTIONS_BY_FAMILY.items() if prediction_type in types]
        raise ValueError(f"{prediction_type!r} prediction does not fit a {family} noise schedule; "
                         f"use a {' or '.join(fits)} schedule for it")


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: registry name.
        fn: the native sampler `fn(denoiser, x, sigmas, *, cond, callback) -> x`.
        steps: its core generator `steps(x, sigmas, schedule, **options)` (see samplers.loop).
        order: convergence order (UniPC: predictor order + 1 from the corrector).
        evals_per_step: model evaluations per step.
        paper: citation.
        last_step_evals: evaluations of the last step when the schedule ends at 0 (Heun's and
            DPM-Solver++(2S)'s last step is a single Euler step); None means evals_per_step.
        options: fixed keyword options bound to `steps` (e.g. the multistep order).
        predictions: prediction types the solver accepts (through the Denoiser adapters).
        families: noise schedule families the solver works on.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    steps: Callable[..., SolverSteps]
    order: int
    evals_per_step: int
    paper: str
    last_step_evals: int | None = None
    options: dict = field(default_factory=dict)
    predictions: tuple[str, ...] = PREDICTION_TYPES
    families: tuple[str, ...] = FAMILIES

    @property
    def supports_partial_start(self) -> bool:
        """Whether a run can start mid-walk (img2img, inpainting): one evaluation per step, so each
        entry of a scheduler's timesteps is the start of a step."""
        return self.evals_per_step == 1

    def nfe(self, num_steps: int) -> int:
        """Exact model evaluations for `num_steps` steps of a schedule ending at 0 (per guidance branch)."""
        last = self.evals_per_step if self.last_step_evals is None else self.last_step_evals
        return (num_steps - 1) * self.evals_per_step + last

    def steps_for_nfe(self, nfe: int) -> int:
        """The step count that spends exactly `nfe` evaluations, or a ValueError naming the nearest."""
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"an NFE budget must be an integer >= 1, got {nfe!r}")
        reachable = [self.nfe(num_steps) for num_steps in range(1, nfe + 2)]
        if nfe in reachable:
            return reachable.index(nfe) + 1
        nearest = [v for v in (max((v for v in reachable if v < nfe), default=None),
                               min(v for v in reachable if v > nfe)) if v is not None]
        raise ValueError(f"solver {self.name!r} cannot spend exactly {nfe} evaluations "
                         f"({self.evals_per_step} per step); use nfe={' or '.join(map(str, nearest))} "
                         "or a one-evaluation solver")

    def check_fits(self, prediction_type: str, family: str) -> None:
        """Raises ValueError if this solver cannot sample a model of this prediction type and family."""
        check_prediction(prediction_type, family)
        if prediction_type not in self.predictions or family not in self.families:
            fits = [spec.name for spec in SOLVERS.values()
                    if prediction_type in spec.predictions and family in spec.families]
            raise ValueError(f"solver {self.name!r} does not fit a {prediction_type!r} {family} model; "
                             f"use one of: {', '.join(fits)}")

    def make_steps(self, x: torch.Tensor, sigmas: torch.Tensor, schedule, **options) -> SolverSteps:
        """The core generator bound to x, sigmas and the model's noise schedule.

        The option `compensation` (one ratio per step) wraps any core in
        `samplers.compensation.compensated_steps`; the rest go to the solver's core.
        """
        ratios = options.pop("compensation", None)
        core = self.steps(x, sigmas, schedule, **{**self.options, **options})
        if ratios is None:
            return core
        from samplers.compensation import check_ratios, compensated_steps

        return compensated_steps(core, check_ratios(ratios, len(sigmas) - 1))


@dataclass(frozen=True)
class ScheduleSpec:
    """A registered schedule: `fn(num_steps, **options)` (flow) or `fn(num_steps, schedule, **options)`.

    Attributes:
        name: registry name.
        fn: the `get_sigmas_*` function.
        family: "flow", "vp", or "any" (takes the model's noise schedule and checks it itself).
        paper: citation.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    family: str
    paper: str

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    def check_family(self, family: str | None) -> None:
        """Raises ValueError if this schedule is not for models of this noise schedule family."""
        if self.family not in ("any", family):
            fits = [name for name, spec in SCHEDULES.items() if spec.family in ("any", family)]
            raise ValueError(f"schedule {self.name!r} is for {self.family} models, this model is {family}; "
                             f"use one of: {', '.join(fits)}")

    def sigmas(self, num_steps: int, schedule, **options) -> torch.Tensor:
        """The (num_steps + 1,) walk for a model with noise schedule `schedule`, or a ValueError."""
        self.check_family(getattr(schedule, "name", None))
        accepted = list(inspect.signature(self.fn).parameters)[1 if self.family == "flow" else 2:]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"schedule {self.name!r} takes no option {', '.join(unknown)}; "
                             f"its options are: {', '.join(accepted)}")
        if self.family == "flow":
            return self.fn(num_steps, **options)
        return self.fn(num_steps, schedule, **options)


_DPM = "DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095)"
_UNIPC = "UniPC (Zhao et al. 2023, arXiv:2302.04867)"

SOLVERS: dict[str, SolverSpec] = {spec.name: spec for spec in (
    SolverSpec("euler", sample_euler, euler_steps, order=1, evals_per_step=1,
               paper="Euler / DDIM (Song et al. 2021, arXiv:2010.02502)"),
    SolverSpec("ddim", sample_ddim, ddim_steps, order=1, evals_per_step=1,
               paper="DDIM with eta (Song et al. 2021, arXiv:2010.02502)"),
    SolverSpec("heun", sample_heun, heun_steps, order=2, evals_per_step=2, last_step_evals=1,
               paper="Heun (Karras et al. 2022, arXiv:2206.00364, Alg. 1)"),
    SolverSpec("midpoint", sample_midpoint, midpoint_steps, order=2, evals_per_step=2,
               paper="explicit midpoint (Runge-Kutta 2; Hairer et al. 1993, Solving ODEs I)"),
    SolverSpec("dpmpp_2s", sample_dpmpp_2s, dpmpp_2s_steps, order=2, evals_per_step=2, last_step_evals=1,
               paper=f"{_DPM}, 2S single-step"),
    SolverSpec("dpmpp_2m", sample_dpmpp_2m, dpmpp_multistep_steps, order=2, evals_per_step=1,
               options={"order": 2}, paper=f"{_DPM}, 2M multistep"),
    SolverSpec("dpmpp_3m", sample_dpmpp_3m, dpmpp_multistep_steps, order=3, evals_per_step=1,
               options={"order": 3}, paper=f"{_DPM}, 3M multistep"),
    SolverSpec("unipc_bh1", sample_unipc_bh1, unipc_steps, order=3, evals_per_step=1,
               options={"order": 2, "variant": "bh1"}, paper=f"{_UNIPC}, UniPC-2 bh1"),
    SolverSpec("unipc_bh2", sample_unipc_bh2, unipc_steps, order=3, evals_per_step=1,
               options={"order": 2, "variant": "bh2"}, paper=f"{_UNIPC}, UniPC-2 bh2"),
    SolverSpec("ipndm", sample_ipndm, ipndm_steps, order=4, evals_per_step=1, options={"order": 4},
               paper="iPNDM (Zhang & Chen 2023, DEIS, arXiv:2204.13902), lower-order warm start"),
)}

SCHEDULES: dict[str, ScheduleSpec] = {spec.name: spec for spec in (
    ScheduleSpec("flow", get_sigmas_flow, "flow", "uniform flow time (Lipman et al. 2023, arXiv:2210.02747)"),
    ScheduleSpec("sd3", get_sigmas_sd3, "flow", "SD3 static shift 3 (Esser et al. 2024, arXiv:2403.03206)"),
    ScheduleSpec("flux", get_sigmas_flux, "flow", "FLUX resolution-dependent shift (Black Forest Labs 2024)"),
    ScheduleSpec("flow_karras", get_sigmas_flow_karras, "flow", "Karras et al. 2022 (arXiv:2206.00364) in t"),
    ScheduleSpec("flow_logsnr", get_sigmas_flow_logsnr, "flow", "uniform log-SNR (Lu et al. 2022, arXiv:2206.00927)"),
    ScheduleSpec("karras", get_sigmas_vp_karras, "vp", "Karras et al. 2022 (arXiv:2206.00364, eq. 5)"),
    ScheduleSpec("logsnr", get_sigmas_vp_logsnr, "vp", "uniform log-SNR (Lu et al. 2022, arXiv:2206.00927)"),
    ScheduleSpec("timestep", get_sigmas_vp_timestep, "vp", "uniform trailing timesteps (Lin et al. 2024, arXiv:2305.08891)"),
    ScheduleSpec("optimized", get_sigmas_optimized, "any", "calibrated on samples (samplers.optimized)"),
)}

DEFAULT_SCHEDULES = {"flow": "flow", "vp": "karras"}


def get_solver(name: str) -> SolverSpec:
    """Looks a solver up by name, with an error listing the known names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def get_schedule(name: str) -> ScheduleSpec:
    """Looks a schedule up by name, with an error listing the known names."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name]
