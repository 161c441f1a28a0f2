"""Executing stacks on the embedded model: inputs, generation under the FLOP counter, timing,
and quality. Shared by `accel run` and `accel ablate`."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from accel import measure
from accel.adapter_files import check_adapter_fits
from accel.data_files import resolve_data_file
from accel.distributed import batch_slices, is_main_process, map_batches
from accel.embedded import FLUX_DIGITS_DIR, JudgeFeatures, load_flux_digits, load_judge
from accel.embedded.data import real_reference_set
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise
from accel.io import claim_folder, first_line, save_safetensors
from accel.native import installed_adapters, installed_cache, plan_of, resolve_recipe


@dataclass
class Inputs:
    """What every stack of one run generates: labels (N,) and initial noise (N, 1, H, W)."""

    labels: torch.Tensor
    noise: torch.Tensor


def build_inputs(recipe: DictConfig) -> Inputs:
    classes = torch.tensor(list(recipe.inputs.classes))
    labels = classes.repeat_interleave(recipe.inputs.samples_per_class)
    side = recipe.inputs.resolution
    noise = sample_noise(recipe.inputs.seed, range(len(labels)), (1, side, side))
    return Inputs(labels=labels, noise=noise)


def model_device(recipe: DictConfig) -> str:
    """Where the embedded model runs: the recipe's model.device, else the CPU."""
    return recipe.model.device or "cpu"


def model_folder(name: str) -> Path:
    """The weights folder of an embedded model name or a local folder."""
    return FLUX_DIGITS_DIR if name == "flux-digits" else Path(name)


def refuse_hub_model(name: str) -> None:
    """`accel run` / `accel ablate` run the embedded models and local folders, not hub models."""
    from accel.recipe.validate import is_hub_id

    if is_hub_id(name):
        raise ValueError(f"model.name: {name} is a hub model; `accel run`/`accel ablate` run the embedded models "
                         "(and local folders) — load the pipeline yourself and use accel.apply(pipe, recipe)")


def load_embedded_model(name: str, device: str):
    """The embedded model by name, or a FluxDigits-layout folder (transformer/ + conditioner/)."""
    refuse_hub_model(name)
    return load_flux_digits(device=device) if name == "flux-digits" else load_flux_digits(name, device=device)


def check_adapters_fit(recipe: DictConfig, model) -> None:
    """Refuses (StackError) a recipe adapter whose LoRA shapes do not fit the model, before any work."""
    for adapter in recipe.adapters:
        check_adapter_fits(model.transformer, adapter.path, "transformer")


def plan_from(section: DictConfig) -> SamplingPlan:
    """The sampling plan of a recipe section (sampler or eval.reference); an optimised walk's
    `embedded:` name resolved to its file inside the package."""
    params = OmegaConf.to_container(section.schedule_params)
    if section.schedule == "optimized" and params.get("path"):
        params["path"] = str(resolve_data_file(params["path"], what="optimised schedule"))
    return SamplingPlan(solver=section.solver, steps=section.steps, schedule=section.schedule,
                        schedule_params=params, solver_params=OmegaConf.to_container(section.solver_params))


class Evaluator:
    """Quality of generated images (N, 1, H, W) in [-1, 1] against the reference and real data."""

    def __init__(self, recipe: DictConfig, labels: torch.Tensor):
        self.metrics = list(recipe.eval.metrics)
        self.labels = labels
        self.judge = load_judge()
        self.fd = None
        if "fd" in self.metrics:
            real, _ = real_reference_set(recipe.eval.real_samples, recipe.inputs.resolution)
            self.fd = measure.FrechetDistance(JudgeFeatures(self.judge), measure.to_unit_range(real))

    def __call__(self, images: torch.Tensor, reference: torch.Tensor, label: str = "images") -> dict:
        """The metrics of `images` against `reference` (both (N, 1, H, W) in [-1, 1]).

        Raises:
            NonFiniteImagesError: `images` or `reference` hold NaN or infinity (named by `label`).
        """
        measure.check_finite(images, label)
        measure.check_finite(reference, "reference")
        unit, unit_ref = measure.to_unit_range(images), measure.to_unit_range(reference)
        result = {}
        if "psnr" in self.metrics:
            result["psnr"] = measure.psnr(unit, unit_ref)
        if "ssim" in self.metrics:
            result["ssim"] = measure.ssim(unit, unit_ref)
        if self.fd is not None:
            result["fd"] = self.fd(unit)
        if "accuracy" in self.metrics:
            result["accuracy"] = measure.class_accuracy(self.judge, unit, self.labels)
        return result


def _generate_counted(denoiser, plan: SamplingPlan, inputs: Inputs, recipe: DictConfig,
                      label: str, split: bool) -> tuple[torch.Tensor, int]:
    """Generates every sample batch by batch, each batch under the FLOP counter; with `split`,
    the batches are dealt across the launched processes and gathered."""
    device = model_device(recipe)
    slices = batch_slices(len(inputs.labels), recipe.inputs.batch_size)
    progress = tqdm(total=len(slices), desc=label, leave=False, disable=split and not is_main_process())

    def work(piece: slice) -> tuple[torch.Tensor, int]:
        images, flops = measure.count_flops(lambda: generate(
            denoiser, plan, inputs.noise[piece], inputs.labels[piece], recipe.inputs.batch_size,
            device=device))
        progress.update(1)
        return images, flops

    results = map_batches(work, slices) if split else [work(piece) for piece in slices]
    progress.close()
    return torch.cat([images for images, _ in results]), sum(flops for _, flops in results)


def reference_cache_key(recipe: DictConfig, plan: SamplingPlan, model_dir: Path) -> str:
    """Everything the reference images and FLOPs are a deterministic function of."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    digest.update(json.dumps({
        "plan": [plan.solver, plan.steps, plan.schedule, plan.schedule_params, plan.solver_params],
        "inputs": OmegaConf.to_container(recipe.inputs), "guidance": reference_guidance(recipe),
        "model": [model_device(recipe), recipe.model.dtype], "torch": torch.__version__,
        "threads": torch.get_num_threads()}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _read_cached(cache_file: Path) -> tuple[torch.Tensor, int] | None:
    """(images, FLOPs) of a reference cache file, or None (with a message) when it is unreadable."""
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            images, flops = handle.get_tensor("images"), int(handle.metadata()["flops"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        print(f"accel: {cache_file} is unreadable ({first_line(error)}); generating the reference again",
              file=sys.stderr, flush=True)
        return None
    if not bool(torch.isfinite(images).all()):
        print(f"accel: {cache_file} holds non-finite images; generating the reference again", file=sys.stderr)
        return None
    return images, flops


def _cached_generation(cache_file: Path | None, generate_fn, label: str) -> tuple[torch.Tensor, int]:
    """(images, FLOPs) from the cache file when present and readable, else generated, checked to be
    finite and (main process) cached."""
    if cache_file is not None and cache_file.is_file():
        cached = _read_cached(cache_file)
        if cached is not None:
            return cached
    images, flops = generate_fn()
    measure.check_finite(images, label)
    if cache_file is not None and is_main_process():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(cache_file, {"images": images}, metadata={"flops": str(flops)})
    return images, flops


def reference_guidance(recipe: DictConfig) -> float:
    """The reference's guidance scale: eval.reference.guidance_scale, else the recipe's guidance.scale."""
    scale = recipe.eval.reference.get("guidance_scale")
    return float(recipe.guidance.scale if scale is None else scale)


def reference_denoiser(recipe: DictConfig, model):
    """The full-compute reference's denoiser: the base model (no adapters) at the reference guidance."""
    return flux_digits_denoiser(model, reference_guidance(recipe))


def measure_plan(label: str, kind: str, plan: SamplingPlan, denoiser, inputs: Inputs,
                 recipe: DictConfig, split: bool = True, cache_file: Path | None = None,
                 guidance_scale: float | None = None) -> tuple[dict, torch.Tensor]:
    """Generates all samples under the FLOP counter, then times a batch; returns (record, images).

    Wall-clock is the median of `eval.timing_repeats` timed generations of the first
    `eval.timing_batch` samples after one warm-up, measured on the main process (on this process
    when not `split`). With `cache_file` (the reference), images and counted FLOPs of an identical
    earlier generation are reused; the wall-clock is always measured anew, beside the run.
    `guidance_scale` (default: the recipe's) sets the passes counted in `nfe`.

    Raises:
        NonFiniteImagesError: the generated images hold NaN or infinity (named by `label`).
    """
    device = model_device(recipe)
    images, flops = _cached_generation(
        cache_file, lambda: _generate_counted(denoiser, plan, inputs, recipe, label, split), label)
    wall = time_plan(denoiser, plan, inputs, recipe) if is_main_process() or not split else float("nan")
    record = {
        "label": label, "kind": kind, "solver": plan.solver, "steps": plan.steps,
        "schedule": plan.schedule, "schedule_params": plan.schedule_params,
        "solver_params": plan.solver_params,
        "nfe": plan.nfe(recipe.guidance.scale if guidance_scale is None else guidance_scale),
        "flops": flops, "tflops": flops / 1e12,
        "wall_seconds": wall, "peak_memory_mb": measure.peak_memory_mb(device),
    }
    return record, images


def time_plan(denoiser, plan: SamplingPlan, inputs: Inputs, recipe: DictConfig) -> float:
    """Median seconds of `eval.timing_repeats` generations of the first `eval.timing_batch` samples,
    after one warm-up."""
    device = model_device(recipe)
    timing = slice(0, recipe.eval.timing_batch)
    return measure.time_median(
        lambda: generate(denoiser, plan, inputs.noise[timing], inputs.labels[timing], recipe.eval.timing_batch,
                         device=device),
        repeats=recipe.eval.timing_repeats, warmup=1, device=device)


def measure_stack(label: str, recipe: DictConfig, model, inputs: Inputs,
                  split: bool = True) -> tuple[dict, torch.Tensor]:
    """Resolves the recipe's stack, installs it (adapters, then the cache, calibrated with the
    adapters in place), measures it; the record carries the resolved stack."""
    resolved = resolve_recipe(recipe, model)
    guidance = resolved.stack.guidance
    denoiser = flux_digits_denoiser(model, guidance.scale, guidance.uncond_interval)
    with installed_adapters(model, resolved), installed_cache(model, resolved, denoiser, recipe) as cache:
        record, images = measure_plan(label, "stack", plan_of(resolved), denoiser, inputs, recipe, split)
        if cache is not None:
            record["cache_last_generation"] = cache.stats.last_run().to_dict()
    record["stack"] = resolved.to_dict()
    return record, images


def prepare_run(recipe: DictConfig, command: str) -> Path:
    """Checks what can only be checked on this machine before any work: the device exists, and
    `<output.dir>/<name>/` can be created for `command` (refused if another command wrote it; an
    OSError naming the path where it cannot be written). Returns the folder."""
    from accel.recipe.validate import check_device_available

    refuse_hub_model(recipe.model.name)
    check_device_available("model.device", model_device(recipe))
    return claim_folder(Path(recipe.output.dir) / recipe.name, command)


def add_speedups(record: dict, reference: dict) -> dict:
    """FLOPs and wall-clock speedups of `record` against the reference record."""
    record["flops_speedup"] = reference["flops"] / record["flops"]
    record["wall_speedup"] = reference["wall_seconds"] / record["wall_seconds"]
    return record
