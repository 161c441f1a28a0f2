"""The recipe schema: omegaconf structured configs, one dataclass per section.

Every field is documented in docs/recipes.md, which tests/test_recipes.py checks against this
schema. Components are chosen by name from the project's registries; a recipe never names a
Python path, so a recipe from someone else cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """Which model to run."""

    name: str = "flux-digits"  # an embedded model name, a local diffusers pipeline folder, or a hub id
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; null: as loaded (embedded models: float32)
    device: Optional[str] = None  # cpu | cuda | cuda:N; null: where the pipeline is (embedded models: cpu)
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained options, e.g. {variant: fp16}


@dataclass
class SamplerConfig:
    """The solver and its schedule."""

    solver: str = "euler"  # a name from samplers.SOLVERS
    steps: int = 8  # solver steps (NFE = steps * the solver's evaluations per step)
    schedule: str = "auto"  # auto (the pipeline scheduler's own walk) or a name from samplers.SCHEDULES
    schedule_params: dict[str, Any] = field(default_factory=dict)  # e.g. {shift: 3.0}
    solver_params: dict[str, Any] = field(default_factory=dict)  # e.g. {eta: 0.5} for ddim


@dataclass
class CacheConfig:
    """The cache policy: a named preset and its parameters, or none."""

    preset: Optional[str] = None  # a name from caching's presets, or null for no cache
    params: dict[str, Any] = field(default_factory=dict)  # the preset's parameters


@dataclass
class AdapterConfig:
    """One LoRA adapter in diffusers format."""

    path: str = ""  # a .safetensors file or a folder holding one
    scale: float = 1.0  # LoRA scale
    fuse: bool = False  # fuse into the weights before running (and before cache calibration)


@dataclass
class GuidanceConfig:
    """Classifier-free guidance."""

    scale: float = 4.0  # guidance scale; 1 evaluates the cond branch only
    distilled: bool = False  # a guidance-distilled model: no uncond pass exists
    uncond_interval: int = 1  # compute the uncond branch every this many steps (1: always)


@dataclass
class InputsConfig:
    """What to generate: prompts (or the embedded models' classes) and seeds."""

    classes: list[int] = field(default_factory=lambda: list(range(10)))  # embedded models: class labels
    samples_per_class: int = 10  # embedded models: samples per class
    prompts: list[str] = field(default_factory=list)  # text pipelines: the prompts
    prompt_file: Optional[str] = None  # text pipelines: a file of prompts, one a line (added to prompts)
    samples_per_prompt: int = 1  # text pipelines: samples (seeds) per prompt
    negative_prompt: Optional[str] = None  # the negative prompt of every sample (CFG)
    seed: int = 0  # base seed; sample i uses seed * 1_000_003 + i
    batch_size: int = 100  # samples per pipeline call
    resolution: Optional[Any] = None  # an int or [height, width]; null: the pipeline's default
    frames: Optional[int] = None  # video pipelines: frames per video; null: the pipeline's default
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # further pipeline call arguments


@dataclass
class ReferenceConfig:
    """The full-compute reference that quality is measured against."""

    solver: Optional[str] = None  # null: the pipeline's own scheduler
    steps: int = 50
    schedule: str = "auto"
    schedule_params: dict[str, Any] = field(default_factory=dict)
    solver_params: dict[str, Any] = field(default_factory=dict)
    guidance_scale: Optional[float] = None  # the reference's CFG scale; null: the recipe's guidance.scale


@dataclass
class EvalConfig:
    """How to measure."""

    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    metric_models: dict[str, Any] = field(default_factory=dict)  # metric -> local weights (clip_score, image_reward)
    real_samples: int = 2000  # embedded models: real images for the FD statistics
    cache_reference: bool = True  # reuse the reference images and FLOPs of an identical earlier run
    timing_batch: int = 10  # samples per timed call
    timing_repeats: int = 3  # timed repeats after one warm-up; the median is reported


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "runs"  # results are written to <dir>/<name>/ under the working directory


@dataclass
class AblationConfig:
    """The grid of `accel ablate`: named axes, plus the equal-FLOPs baseline family."""

    axes: dict[str, Any] = field(default_factory=dict)  # recipe key -> list of values (grid = product)
    baseline_solvers: list[str] = field(default_factory=lambda: ["euler", "dpmpp_2m", "unipc_bh2"])
    baseline_steps: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8, 10, 12, 16, 25])
    grid_rows: int = 8  # stacks shown in the image grid (best PSNR first)


@dataclass
class CalibrateConfig:
    """What `accel calibrate` searches on: samples that are never evaluated."""

    samples: int = 10  # calibration samples (the prompts or classes cycled)
    seed: int = 0  # base seed, offset by 7,777,777 so no calibration seed is an evaluated one
    prompts: list[str] = field(default_factory=list)  # text pipelines: calibration prompts (default: inputs')
    prompt_file: Optional[str] = None  # text pipelines: a file of calibration prompts, one a line


@dataclass
class Recipe:
    """A whole stack and how to measure it."""

    name: str = "embedded-demo"
    calibration: Optional[str] = None  # a calibration file made by `accel calibrate` for this recipe
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapters: list[AdapterConfig] = field(default_factory=list)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
