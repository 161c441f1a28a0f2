"""`accel run`: the full-compute reference and the configured stack on the same seeds, measured."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tqdm import tqdm

from accel import measure
from accel.distributed import batch_slices, is_main_process, map_batches, process_state, wait_for_everyone
from accel.embedded import JudgeFeatures, load_flux_digits, load_judge
from accel.embedded.data import real_reference_set
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise
from accel.native import installed_cache, plan_of, resolve_recipe
from accel.recipe import to_yaml
from accel.report import format_table, markdown_table, save_grid


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


def load_embedded_model(name: str, device: str):
    """The embedded model by name, or a FluxDigits-layout folder (transformer/ + conditioner/)."""
    return load_flux_digits(device=device) if name == "flux-digits" else load_flux_digits(name, device=device)


def plan_from(section: DictConfig) -> SamplingPlan:
    return SamplingPlan(solver=section.solver, steps=section.steps, schedule=section.schedule,
                        schedule_params=OmegaConf.to_container(section.schedule_params),
                        solver_params=OmegaConf.to_container(section.solver_params))


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

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> dict:
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
                      label: str) -> tuple[torch.Tensor, int]:
    """Generates every sample, batch by batch across processes, each batch under the FLOP counter."""
    device = recipe.model.device
    slices = batch_slices(len(inputs.labels), recipe.inputs.batch_size)
    progress = tqdm(total=len(slices), desc=label, leave=False, disable=not is_main_process())

    def work(piece: slice) -> tuple[torch.Tensor, int]:
        images, flops = measure.count_flops(lambda: generate(
            denoiser, plan, inputs.noise[piece], inputs.labels[piece], recipe.inputs.batch_size,
            device=device))
        progress.update(1)
        return images, flops

    results = map_batches(work, slices)
    progress.close()
    return torch.cat([images for images, _ in results]), sum(flops for _, flops in results)


def measure_plan(label: str, kind: str, plan: SamplingPlan, denoiser, inputs: Inputs,
                 recipe: DictConfig) -> tuple[dict, torch.Tensor]:
    """Generates all samples under the FLOP counter, then times a batch; returns (record, images).

    Wall-clock is the median of `eval.timing_repeats` timed generations of the first
    `eval.timing_batch` samples after one warm-up, measured on the main process.
    """
    device = recipe.model.device
    images, flops = _generate_counted(denoiser, plan, inputs, recipe, label)
    wall = float("nan")
    if is_main_process():
        timing = slice(0, recipe.eval.timing_batch)
        wall = measure.time_median(
            lambda: generate(denoiser, plan, inputs.noise[timing], inputs.labels[timing],
                             recipe.eval.timing_batch, device=device),
            repeats=recipe.eval.timing_repeats, warmup=1, device=device)
    record = {
        "label": label, "kind": kind, "solver": plan.solver, "steps": plan.steps,
        "schedule": plan.schedule, "schedule_params": plan.schedule_params,
        "solver_params": plan.solver_params,
        "nfe": plan.nfe(recipe.guidance.scale), "flops": flops, "tflops": flops / 1e12,
        "wall_seconds": wall, "peak_memory_mb": measure.peak_memory_mb(device),
    }
    return record, images


def run_recipe(recipe: DictConfig) -> dict | None:
    """Runs the reference and the configured stack, writes the outputs, returns the summary.

    Under `accelerate launch` the batches are split across processes; the main process
    measures, writes and returns the summary, the others return None.
    """
    torch.manual_seed(recipe.inputs.seed)
    model = load_embedded_model(recipe.model.name, recipe.model.device)
    denoiser = flux_digits_denoiser(model, recipe.guidance.scale)
    inputs = build_inputs(recipe)
    resolved = resolve_recipe(recipe, model)
    if is_main_process():
        print(resolved.describe(), flush=True)
    reference, ref_images = measure_plan("reference", "reference", plan_from(recipe.eval.reference),
                                         denoiser, inputs, recipe)
    with installed_cache(model, resolved, denoiser, recipe) as cache:
        configured, run_images = measure_plan(recipe.name, "run", plan_of(resolved), denoiser, inputs, recipe)
        if cache is not None:
            configured["cache_last_generation"] = cache.stats.last_run().to_dict()
    summary = None
    if is_main_process():
        evaluate = Evaluator(recipe, inputs.labels)
        for record, images in ((reference, ref_images), (configured, run_images)):
            record.update(evaluate(images, ref_images))
            record["flops_speedup"] = reference["flops"] / record["flops"]
            record["wall_speedup"] = reference["wall_seconds"] / record["wall_seconds"]
        summary = {"name": recipe.name, "num_processes": process_state().num_processes,
                   "runs": [reference, configured], "stack": resolved.to_dict(),
                   "recipe": OmegaConf.to_container(recipe, resolve=True)}
        write_outputs(recipe, summary, ref_images, run_images, inputs.labels)
    wait_for_everyone()
    return summary


def _first_per_class(images: torch.Tensor, labels: torch.Tensor, per_class: int = 2) -> torch.Tensor:
    picks = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in labels.unique(sorted=True)]
    return images[torch.cat(picks)]


def write_outputs(recipe: DictConfig, summary: dict, ref_images: torch.Tensor,
                  run_images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Writes summary.json, recipe.yaml, report.md and grid.png under <output.dir>/<name>/."""
    folder = Path(recipe.output.dir) / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "recipe.yaml").write_text(to_yaml(recipe))
    (folder / "stack.json").write_text(json.dumps(summary["stack"], indent=2, default=str))
    picked = _first_per_class(labels[:, None].float(), labels)[:, 0].long()
    save_grid([measure.to_unit_range(_first_per_class(ref_images, labels)),
               measure.to_unit_range(_first_per_class(run_images, labels))],
              ["reference", recipe.name], folder / "grid.png",
              column_titles=[str(int(c)) for c in picked])
    reference, run = summary["runs"]
    (folder / "report.md").write_text(
        f"# {recipe.name}\n\n"
        f"Reference: {plan_from(recipe.eval.reference).describe()}; run: "
        f"{plan_from(recipe.sampler).describe()}, cache {summary['stack']['cache_policy'] or 'none'}; "
        f"guidance {recipe.guidance.scale}, "
        f"{len(labels)} samples, same seeds.\n\n"
        f"{markdown_table(summary['runs'])}\n\n![reference vs run](grid.png)\n\n"
        f"## Resolved recipe\n\n```yaml\n{to_yaml(recipe)}```\n")
    print(format_table(summary["runs"]))
    print(f"\nwrote {folder}/summary.json, report.md, grid.png")
    return folder
