"""diffusers' own schedulers as anchors of the samplers benchmark, installed in the model's pipeline.

Each `DiffusersConfig` is one scheduler setting: a class, its config (betas added for VP models)
and how the diffusers pipeline it comes from calls `set_timesteps` (SD3 and SD: the step count;
FLUX: `sigmas = linspace(1, 1/N, N)` and `mu` from the image size). `anchor_configuration` makes it
a lab `Configuration` whose `install` swaps `pipe.scheduler` for that scheduler while the
configuration runs and puts the pipeline's own back afterwards; the pipeline's loop
(`set_timesteps`, `scale_model_input`, the model at the scheduler's timestep, `step`) does the rest.
A scheduler meets an NFE budget with the step count whose timesteps number exactly that budget
(FlowMatchHeun spends 2N - 1).

DPMSolverMultistep and UniPCMultistep with flow sigmas truncate their timesteps to integers; the
flow model is given the exact time of each level instead (their `sigmas`), which only helps them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)

from accel.bench._samplers_models import FLOW_IMAGE_SEQ_LEN, BETA_KEYS
from accel.lab.job import Configuration
from accel.stack import GuidancePlan
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
        flux_sigmas: called as FluxPipeline calls it (its sigmas and mu), else with the step count.
    """

    solver: str
    schedule: str
    cls: type
    config: dict = field(default_factory=dict)
    flux_sigmas: bool = False

    @property
    def exact_flow_time(self) -> bool:
        """Whether the model gets each level's exact flow time instead of the integer timestep."""
        return bool(self.config.get("use_flow_sigmas"))

    def build(self, betas: dict | None) -> Any:
        return self.cls(**{**(betas or {}), **self.config})

    def set_timesteps(self, scheduler: Any, num_steps: int, device: Any = None) -> None:
        """Calls the scheduler's own set_timesteps as the pipeline this setting comes from does."""
        native = type(scheduler).set_timesteps
        if self.flux_sigmas:
            native(scheduler, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=FLUX_MU, device=device)
        else:
            native(scheduler, num_steps, device=device)
        if self.exact_flow_time:
            scheduler.timesteps = (scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps).to(
                device=scheduler.timesteps.device, dtype=torch.float32)

    def describe(self) -> dict:
        """JSON-ready identity (part of the record's fingerprint)."""
        return {"scheduler": self.cls.__name__, "config": self.config,
                "set_timesteps": "FluxPipeline's sigmas and mu" if self.flux_sigmas else "the step count",
                "exact_flow_time": self.exact_flow_time}


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


def configs_for(family: str) -> list[DiffusersConfig]:
    """The anchors of a model family ("flow" or "vp")."""
    return flow_configs() if family == "flow" else epsilon_configs()


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


def anchored_scheduler(config: DiffusersConfig, betas: dict | None) -> Any:
    """The scheduler of `config`, whose set_timesteps (called by the pipeline) follows the setting's own
    pipeline convention, whatever arguments the pipeline passes."""
    scheduler = config.build(betas)

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **ignored: Any) -> None:
        config.set_timesteps(scheduler, num_inference_steps, device)

    scheduler.set_timesteps = set_timesteps
    return scheduler


@contextlib.contextmanager
def installed(config: DiffusersConfig, pipe: Any) -> Iterator[None]:
    """Swaps `pipe.scheduler` for the anchor's (on the pipeline's own betas) and restores it after."""
    own = pipe.scheduler
    betas = {key: own.config[key] for key in BETA_KEYS} if "beta_start" in own.config else None
    pipe.scheduler = anchored_scheduler(config, betas)
    try:
        yield
    finally:
        pipe.scheduler = own


def anchor_configuration(config: DiffusersConfig, nfe: int, betas: dict | None, guidance: float) -> Configuration:
    """The lab configuration of one anchor at exactly `nfe` evaluations per guidance branch.

    Raises:
        ValueError: the scheduler cannot spend exactly `nfe` evaluations.
    """
    steps = steps_for_nfe(config, nfe, betas)
    return Configuration(f"diffusers {config.solver}/{config.schedule} NFE {nfe}", "anchor", None, steps,
                         GuidancePlan(guidance), install=functools.partial(installed, config),
                         identity=config.describe())
