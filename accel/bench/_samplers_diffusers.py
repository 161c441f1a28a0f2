"""diffusers' own schedulers on the embedded models, driven by a small pipeline-like loop.

Each `DiffusersConfig` builds one scheduler (a class and its config) and the arguments of its
`set_timesteps`; `sample_diffusers` runs set_timesteps / scale_model_input / step around the
model's guided prediction, as a pipeline does, with no pipeline. A scheduler meets an NFE budget
with the step count whose timesteps number exactly that budget (FlowMatchHeun spends 2N - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)

from accel.bench._samplers_models import FLOW_IMAGE_SEQ_LEN, BenchModel
from samplers import flux_mu

FLUX_MU = flux_mu(FLOW_IMAGE_SEQ_LEN)  # FluxPipeline's calculate_shift for 64 image tokens
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, shift=3.0)  # FLUX.1's scheduler_config.json
SD_DDIM = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD 1.x's DDIM settings


@dataclass(frozen=True)
class DiffusersConfig:
    """One diffusers scheduler setting.

    Attributes:
        solver: the scheduler's class name without "Scheduler" (the records' `solver`).
        schedule: a short name of its sigma/timestep setting (the records' `schedule`).
        cls: the scheduler class.
        config: keyword arguments of the class (betas are added for VP models).
        flux_sigmas: pass FluxPipeline's sigmas (linspace(1, 1/N, N)) and mu to set_timesteps.
    """

    solver: str
    schedule: str
    cls: type
    config: dict = field(default_factory=dict)
    flux_sigmas: bool = False

    def build(self, betas: dict | None) -> object:
        return self.cls(**{**(betas or {}), **self.config})

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        if self.flux_sigmas:
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            scheduler.set_timesteps(sigmas=sigmas, mu=FLUX_MU)
        else:
            scheduler.set_timesteps(num_steps)


def _flow_multistep(cls: type, name: str) -> list[DiffusersConfig]:
    base = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    return [DiffusersConfig(name, "shift1", cls, {**base, "flow_shift": 1.0}),
            DiffusersConfig(name, "dynamic", cls, {**base, "flow_shift": math.exp(FLUX_MU)}),
            DiffusersConfig(name, "shift3", cls, {**base, "flow_shift": 3.0})]


def flow_configs() -> list[DiffusersConfig]:
    """FlowMatchEuler (FLUX's dynamic shift as FluxPipeline sets it; static shifts 1 and 3 as SD3),
    FlowMatchHeun (shifts 1, e^mu, 3) and DPMSolverMultistep / UniPCMultistep with flow sigmas."""
    return [
        DiffusersConfig("FlowMatchEulerDiscrete", "shift1", FlowMatchEulerDiscreteScheduler, {"shift": 1.0}),
        DiffusersConfig("FlowMatchEulerDiscrete", "dynamic", FlowMatchEulerDiscreteScheduler, FLUX_SCHEDULER,
                        flux_sigmas=True),
        DiffusersConfig("FlowMatchEulerDiscrete", "shift3", FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
        DiffusersConfig("FlowMatchHeunDiscrete", "shift1", FlowMatchHeunDiscreteScheduler, {"shift": 1.0}),
        DiffusersConfig("FlowMatchHeunDiscrete", "dynamic", FlowMatchHeunDiscreteScheduler,
                        {"shift": math.exp(FLUX_MU)}),
        DiffusersConfig("FlowMatchHeunDiscrete", "shift3", FlowMatchHeunDiscreteScheduler, {"shift": 3.0}),
        *_flow_multistep(DPMSolverMultistepScheduler, "DPMSolverMultistep"),
        *_flow_multistep(UniPCMultistepScheduler, "UniPCMultistep"),
    ]


def epsilon_configs() -> list[DiffusersConfig]:
    """DDIM (SD's leading spacing, and trailing), and DPMSolverMultistep / UniPCMultistep /
    EulerDiscrete with their default linspace timesteps, trailing timesteps and Karras sigmas."""
    configs = [DiffusersConfig("DDIM", "leading", DDIMScheduler, SD_DDIM),
               DiffusersConfig("DDIM", "trailing", DDIMScheduler, {**SD_DDIM, "steps_offset": 0,
                                                                   "timestep_spacing": "trailing"})]
    for name, cls in (("DPMSolverMultistep", DPMSolverMultistepScheduler),
                      ("UniPCMultistep", UniPCMultistepScheduler), ("EulerDiscrete", EulerDiscreteScheduler)):
        configs += [DiffusersConfig(name, "linspace", cls, {}),
                    DiffusersConfig(name, "trailing", cls, {"timestep_spacing": "trailing"}),
                    DiffusersConfig(name, "karras", cls, {"use_karras_sigmas": True})]
    return configs


def steps_for_nfe(config: DiffusersConfig, nfe: int, betas: dict | None) -> int:
    """The step count whose timesteps number exactly `nfe`, or ValueError naming the reachable ones."""
    reachable = {}
    for steps in range(1, nfe + 1):
        scheduler = config.build(betas)
        config.set_timesteps(scheduler, steps)
        reachable[len(scheduler.timesteps)] = steps
        if len(scheduler.timesteps) == nfe:
            return steps
    near = sorted(reachable, key=lambda value: abs(value - nfe))[:2]
    raise ValueError(f"{config.solver} cannot spend exactly {nfe} evaluations (reachable nearby: "
                     f"{', '.join(map(str, sorted(near)))})")


@torch.no_grad()
def _run_batch(config: DiffusersConfig, subject: BenchModel, betas: dict | None, steps: int,
               noise: torch.Tensor, labels: torch.Tensor,
               count: Callable[[], None] | None) -> torch.Tensor:
    scheduler = config.build(betas)
    config.set_timesteps(scheduler, steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        sigma = scheduler.sigmas[index] if hasattr(scheduler, "sigmas") else torch.tensor(float("nan"))
        prediction = subject.diffusers_call(model_input, timestep, sigma, labels)
        if count is not None:
            count()
        x = scheduler.step(prediction, timestep, x, return_dict=False)[0]
    return x


def sample_diffusers(config: DiffusersConfig, subject: BenchModel, betas: dict | None, nfe: int,
                     noise: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     count: Callable[[], None] | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) with a diffusers scheduler at exactly `nfe` evaluations per branch.

    Args:
        config: the scheduler setting.
        subject: the model (its `diffusers_call` gives the guided raw prediction).
        betas: the model's DDPM betas (VP models), None for flow models.
        nfe: model-evaluation budget per guidance branch.
        noise: (N, C, H, W) standard normal noise; x starts as noise * init_noise_sigma (1 for flow schedulers).
        labels: (N,) class labels.
        batch_size: samples per loop.
        count: called once per evaluation (tests count NFE with it).
    """
    steps = steps_for_nfe(config, nfe, betas)
    return torch.cat([_run_batch(config, subject, betas, steps, noise[start:start + batch_size],
                                 labels[start:start + batch_size], count)
                      for start in range(0, noise.shape[0], batch_size)])
