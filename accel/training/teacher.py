"""Teacher trajectories of any diffusers pipeline, and the pipeline prepared for training a student.

`prepare_pipeline` loads the recipe's model (`accel.lab.models.load_model`: an embedded name, a
local pipeline folder or a cached hub id), traces what the pipeline passes its denoiser for the
teacher's prompts (`PipelineTracer`; the per-prompt embeddings are cached beside the trajectories
as `conditioning.safetensors` and reused while the model, prompts and call settings are the same),
reads the walks the teacher and the student take (`schedule: auto` is the pipeline scheduler's own
walk, as `accel.apply` takes it), moves every other component (text encoders, VAE) off the device
and records the teacher: `distill.trajectories.record_trajectories` on the pipeline's denoiser, with
the teacher's solver and guidance, on training seeds no measurement uses (sample i draws its noise
from seed `TRAIN_SEED * 1_000_003 + i` and takes prompt i mod P). Trajectories are safetensors
chunks, resumable, refused when made with other settings (their fingerprint: the denoiser's weights
identity, prompts, call settings, teacher walk, solver, guidance and seed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from accel.lab.fingerprint import fingerprint, module_identity
from accel.training.pipeline_denoiser import PipelineDenoiser
from accel.training.trace import CallSettings, Conditioning, Walk
from accel.training.tracer import PipelineTracer
from distill.trajectories import Trajectories, record_trajectories

TRAIN_SEED = 1000  # measured runs use seeds 0 and up; calibration uses seed + 7,777,777
CONDITIONING_FILE = "conditioning.safetensors"


@dataclass(frozen=True)
class TeacherSettings:
    """The teacher's trajectories.

    Attributes:
        prompts: the training prompts (sample i takes prompt i mod len(prompts)).
        count: trajectories, one per training seed.
        steps: the teacher's steps on the pipeline's own walk (schedule auto).
        solver: the teacher's solver (one model evaluation a step).
        guidance: the teacher's classifier-free guidance scale.
        batch_size: trajectories per recorded chunk.
        folder: where the chunks and the cached conditioning are kept.
        trace_batch: prompts per traced pipeline call.
        seed: base seed of the training noise.
    """

    prompts: tuple[str, ...]
    count: int = 512
    steps: int = 50
    solver: str = "euler"
    guidance: float = 4.0
    batch_size: int = 64
    folder: str = "runs/teacher-trajectories"
    trace_batch: int = 8
    seed: int = TRAIN_SEED


@dataclass
class PreparedPipeline:
    """A pipeline ready for a student: its denoiser (replayed), the teacher and the walks.

    Attributes:
        model: the loaded pipeline (accel.lab.models.LabModel).
        denoiser: its denoiser, called with the traced conditioning.
        teacher: the recorded teacher trajectories (cond: {"prompt": (N,) rows}).
        walks: the student walks asked for, in order.
        base_identity: `module_identity` of the denoiser before any adapter (recorded in adapters).
    """

    model: Any
    denoiser: PipelineDenoiser
    teacher: Trajectories
    walks: list[Walk]
    base_identity: str


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Under `accelerate launch`, the main process runs the block first (recording files the others
    then read); a single process just runs it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from distill.training.backend import launch_state

    with launch_state().main_process_first():
        yield


def process_device(section: Any) -> str | None:
    """`model.device`, with a launched process's own GPU (LOCAL_RANK) where it names cuda without an index."""
    device = section.get("device")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def conditioning_for(tracer: PipelineTracer, teacher: TeacherSettings, meta: dict[str, str]) -> Conditioning:
    """The traced conditioning of the teacher's prompts: read from the teacher folder when it was
    made with the same `meta`, else traced and written there."""
    path = Path(teacher.folder) / CONDITIONING_FILE
    if path.is_file():
        conditioning, stored = Conditioning.load(path)
        if stored == meta:
            return conditioning
        raise ValueError(f"{path} holds prompt embeddings of other settings (model, prompts or call arguments); "
                         "delete the folder or set objective.params.trajectories to another one")
    conditioning = tracer.conditioning(list(teacher.prompts), teacher.trace_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    conditioning.save(path, meta)
    return conditioning


def offload_components(model: Any) -> None:
    """Moves every pipeline component but the denoiser off an accelerator (text encoders, VAE)."""
    if model.device.type == "cpu":
        return
    for name, component in model.pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != model.denoiser_name:
            component.to("cpu")
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_pipeline(section: Any, teacher: TeacherSettings, call: CallSettings,
                     student_walks: Sequence[tuple[int, str]] = ()) -> PreparedPipeline:
    """Loads the model, traces it, records the teacher; see the module docstring.

    Args:
        section: the recipe's `model` section (name, dtype, device, pipeline_kwargs).
        teacher: the teacher's settings.
        call: how the pipeline is called (image size, frames, call arguments, the guidance traced).
        student_walks: (steps, schedule) of each student walk to read off the pipeline's scheduler.
    """
    from accel.generate import sample_noise
    from accel.lab.models import load_model

    model = load_model(section, process_device(section))
    base_identity = module_identity(model.denoiser)
    tracer = PipelineTracer(model.pipe, model.denoiser_name, call)
    teacher_walk = tracer.probe(teacher.steps, list(teacher.prompts))
    walks = [tracer.walk(steps, schedule) for steps, schedule in student_walks]
    pipeline = type(model.pipe).__name__
    traced = {"model": base_identity, "pipeline": pipeline, "prompts": fingerprint({"p": list(teacher.prompts)}),
              "call": fingerprint(call.describe())}
    meta = {"model": base_identity, "pipeline": pipeline, "conditioning": fingerprint(traced),
            "solver": teacher.solver, "steps": str(teacher.steps), "schedule": "auto",
            "walk": fingerprint({"sigmas": teacher_walk.sigmas.tolist(), "timesteps": teacher_walk.timesteps.tolist()}),
            "guidance": f"{teacher.guidance:g}", "seed": str(teacher.seed), "batch_size": str(teacher.batch_size)}
    with main_process_first():
        conditioning = conditioning_for(tracer, teacher, traced)
        offload_components(model)
        denoiser = PipelineDenoiser(model.denoiser, conditioning, tracer.prediction, tracer.schedule, model.device)
        for walk in (teacher_walk, *walks):
            denoiser.use_walk(walk)
        noise = sample_noise(teacher.seed, range(teacher.count), conditioning.x_shape)
        prompts = torch.arange(teacher.count) % conditioning.prompts
        trajectories = record_trajectories(denoiser.denoiser(teacher.guidance), noise, {"prompt": prompts},
                                           solver=teacher.solver, sigmas=teacher_walk.sigmas,
                                           batch_size=teacher.batch_size, folder=teacher.folder, meta=meta,
                                           device=model.device)
    return PreparedPipeline(model, denoiser, trajectories, walks, base_identity)
