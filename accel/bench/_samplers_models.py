"""The two embedded models as subjects of the samplers benchmark.

Each model is a diffusers pipeline loaded by the lab (`FluxDigitsPipeline`, `UNetDigitsPipeline`),
measured through `accel.apply` like any user's pipeline. A `ModelSetup` holds what the bench
fixes per model (guidance, the fine-step reference, our named schedules of its family); a
`BenchModel` adds the loaded pipeline and the native guided `samplers.Denoiser` over the same
modules, which only the walk search (`_samplers_optimized`) uses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

import samplers
from accel.embedded.model import NULL_CLASS
from accel.lab.models import LabModel

# Guidance scales: the flow model's reference setting (the embedded-demo recipe) and the UNet's
# (its weights were checked with 50-step DDIM at guidance 3: accuracy 0.995, FD 0.63).
FLOW_GUIDANCE = 4.0
EPSILON_GUIDANCE = 3.0
# Image tokens of the flow model (16x16 packed into 2x2 patches): FLUX's dynamic shift uses this.
FLOW_IMAGE_SEQ_LEN = 64
BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


@dataclass(frozen=True)
class Reference:
    """How the fine-step reference of a model is made (one of our solvers on one of our schedules)."""

    solver: str
    steps: int
    schedule: str
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.solver}, {self.steps} steps ({self.solver_nfe()} NFE), {self.schedule} schedule"

    def solver_nfe(self) -> int:
        return samplers.get_solver(self.solver).nfe(self.steps)


@dataclass(frozen=True)
class ModelSetup:
    """What the bench fixes for one embedded model.

    Attributes:
        name: "flux-digits" or "unet-digits" (the records' `model`).
        family: "flow" or "vp".
        guidance: the CFG scale of every configuration and of the reference.
        schedules: our named schedules of the family -> their options.
        reference: the fine-step reference.
    """

    name: str
    family: str
    guidance: float
    schedules: dict
    reference: Reference


SETUPS = {
    "flux-digits": ModelSetup("flux-digits", "flow", FLOW_GUIDANCE,
                              {"flow": {}, "sd3": {}, "flux": {"image_seq_len": FLOW_IMAGE_SEQ_LEN},
                               "flow_karras": {}, "flow_logsnr": {}},
                              Reference("heun", 200, "flow")),
    "unet-digits": ModelSetup("unet-digits", "vp", EPSILON_GUIDANCE, {"karras": {}, "logsnr": {}, "timestep": {}},
                              Reference("heun", 200, "karras")),
}


@dataclass
class BenchModel:
    """One model under test: its setup, the loaded pipeline and a native Denoiser on its modules.

    Attributes:
        setup: what the bench fixes for it.
        lab: the pipeline as the lab loaded it (`accel.lab.models.load_model`).
        denoiser: the guided model as a samplers.Denoiser (for the walk search only).
        fingerprint: a hash of the denoiser's parameters (a saved walk of other weights is not reused).
        shape: the shape of one sample (C, H, W): the pipelines' default 16x16.
    """

    setup: ModelSetup
    lab: LabModel
    denoiser: samplers.Denoiser
    fingerprint: str
    shape: tuple[int, ...] = (1, 16, 16)

    @property
    def name(self) -> str:
        return self.setup.name

    @property
    def family(self) -> str:
        return self.setup.family

    @property
    def guidance(self) -> float:
        return self.setup.guidance

    @property
    def schedules(self) -> dict:
        return self.setup.schedules

    @property
    def reference(self) -> Reference:
        return self.setup.reference

    @property
    def schedule_dir(self) -> Path:
        """The walks shipped beside the weights (only read)."""
        return self.lab.folder / "schedules"

    def betas(self) -> dict | None:
        """The DDPM betas of a VP model's scheduler (None for the flow model)."""
        if self.family != "vp":
            return None
        config = self.lab.pipe.scheduler.config
        return {key: config[key] for key in BETA_KEYS}


def weights_fingerprint(modules: list[torch.nn.Module]) -> str:
    """A short hash of the modules' parameters (the provenance of the saved walks)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _guided(model_fn, scale: float) -> samplers.Denoiser:
    return samplers.cfg_model_fn(model_fn, scale, cond_key="labels",
                                 uncond_value=lambda labels: torch.full_like(labels, NULL_CLASS))


def bench_model(setup: ModelSetup, lab: LabModel) -> BenchModel:
    """The subject of one loaded embedded pipeline."""
    pipe = lab.pipe
    if setup.family == "flow":
        guided = _guided(lambda x, sigma, labels: pipe.velocity(x, sigma, labels), setup.guidance)
        denoiser = samplers.Denoiser(guided, prediction_type="flow", schedule=samplers.FlowSchedule())
        modules = [pipe.transformer, pipe.conditioner]
    else:
        from accel.embedded.unet import UNetDigits

        config = pipe.scheduler.config
        unet = UNetDigits(unet=pipe.unet, betas={key: config[key] for key in BETA_KEYS})
        denoiser = unet.denoiser(setup.guidance)
        modules = [pipe.unet]
    return BenchModel(setup, lab, denoiser, weights_fingerprint(modules))
