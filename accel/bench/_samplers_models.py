"""The two embedded models as benchmark subjects: our Denoiser, a diffusers-style model call, the
schedules of ours that fit the model, and the fine-step reference.

A `BenchModel` is everything the samplers benchmark needs from one model, so the sweep code never
branches on the model family. `flow_subject` wraps the FLUX-architecture flow model,
`epsilon_subject` the epsilon UNet; both take loaded model objects, so tests can pass tiny
random-weight models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import samplers
from accel.embedded import NULL_CLASS, FluxDigits
from accel.embedded.unet import UNetDigits
from accel.generate import flux_digits_denoiser

# Guidance scales: the flow model's reference setting (the embedded-demo recipe, its eval script)
# and the UNet's (its weights were checked with 50-step DDIM at guidance 3: accuracy 0.995, FD 0.63).
FLOW_GUIDANCE = 4.0
EPSILON_GUIDANCE = 3.0
# Image tokens of the flow model (16x16 packed into 2x2 patches): FLUX's dynamic shift uses this.
FLOW_IMAGE_SEQ_LEN = 64


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


@dataclass
class BenchModel:
    """One model under test.

    Attributes:
        name: "flux-digits" or "unet-digits" (the records' `model` field).
        family: "flow" or "vp".
        denoiser: the guided model as a samplers.Denoiser (ours).
        diffusers_call: `fn(x, t, sigma, labels)` -> the guided raw prediction (velocity or epsilon)
            as a diffusers pipeline would compute it from the scheduler's timestep t (and sigma).
        schedules: our schedule names for this family -> their options.
        reference: the fine-step reference.
        guidance: the CFG scale used everywhere (model, reference and diffusers loops).
        weights_dir: the folder of the weights (its schedules/ holds shipped optimised walks, only read).
        fingerprint: a hash of the weights (records and schedules of other weights are not reused).
        shape: the shape of one sample.
    """

    name: str
    family: str
    denoiser: samplers.Denoiser
    diffusers_call: Callable[..., torch.Tensor]
    schedules: dict[str, dict]
    reference: Reference
    guidance: float
    weights_dir: Path
    fingerprint: str
    shape: tuple[int, ...] = (1, 16, 16)

    @property
    def schedule_dir(self) -> Path:
        return self.weights_dir / "schedules"


def weights_fingerprint(modules: list[torch.nn.Module]) -> str:
    """A short hash of the modules' parameters (identifies the weights behind cached results)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _guided(fn: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]:
    return samplers.cfg_model_fn(fn, scale, cond_key="labels",
                                 uncond_value=lambda labels: torch.full_like(labels, NULL_CLASS))


def flow_subject(model: FluxDigits, weights_dir: Path, guidance: float = FLOW_GUIDANCE) -> BenchModel:
    """The flow model: our schedules in flow time, reference Heun 200 steps on uniform t.

    diffusers' flow schedulers get the model's time from the scheduler's own sigma (t in [0, 1]);
    DPMSolverMultistep and UniPCMultistep round their timesteps to integers, and feeding the model
    the exact sigma instead is the more accurate choice, so they get it too.
    """
    guided = _guided(lambda x, sigma, labels: model.velocity(x, sigma, labels), guidance)

    def diffusers_call(x, timestep, sigma, labels):
        return guided(x, sigma.to(x.dtype).expand(x.shape[0]), labels=labels)

    schedules = {"flow": {}, "sd3": {}, "flux": {"image_seq_len": FLOW_IMAGE_SEQ_LEN},
                 "flow_karras": {}, "flow_logsnr": {}}
    return BenchModel(name="flux-digits", family="flow", denoiser=flux_digits_denoiser(model, guidance),
                      diffusers_call=diffusers_call, schedules=schedules,
                      reference=Reference("heun", 200, "flow"), guidance=guidance, weights_dir=Path(weights_dir),
                      fingerprint=weights_fingerprint([model.transformer, model.conditioner]),
                      shape=(1, model.resolution, model.resolution))


def epsilon_subject(model: UNetDigits, weights_dir: Path, guidance: float = EPSILON_GUIDANCE) -> BenchModel:
    """The epsilon UNet: our VP schedules, reference Heun 200 steps on Karras sigmas.

    diffusers' schedulers call the UNet with their own timestep, exactly as a pipeline does.
    """
    guided = _guided(lambda x, timestep, labels: model.unet(x, timestep, class_labels=labels).sample, guidance)

    def diffusers_call(x, timestep, sigma, labels):
        return guided(x, torch.as_tensor(timestep).to(x.dtype).expand(x.shape[0]), labels=labels)

    schedules = {"karras": {}, "logsnr": {}, "timestep": {}}
    return BenchModel(name="unet-digits", family="vp", denoiser=model.denoiser(guidance),
                      diffusers_call=diffusers_call, schedules=schedules,
                      reference=Reference("heun", 200, "karras"), guidance=guidance, weights_dir=Path(weights_dir),
                      fingerprint=weights_fingerprint([model.unet]),
                      shape=(1, model.resolution, model.resolution))


@torch.no_grad()
def sample_ours(subject: BenchModel, solver: str, nfe: int | None, schedule: str, options: dict,
                noise: torch.Tensor, labels: torch.Tensor, batch_size: int,
                steps: int | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) with one of our solvers and schedules, batch by batch."""
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        outputs.append(samplers.sample(
            subject.denoiser, noise[start:start + batch_size], solver=solver, nfe=nfe, steps=steps,
            schedule=schedule, schedule_options=dict(options),
            cond={"labels": labels[start:start + batch_size]}))
    return torch.cat(outputs)


def sample_reference(subject: BenchModel, noise: torch.Tensor, labels: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    """The fine-step reference samples of `noise`."""
    ref = subject.reference
    return sample_ours(subject, ref.solver, None, ref.schedule, ref.options, noise, labels, batch_size,
                       steps=ref.steps)
