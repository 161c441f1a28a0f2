"""`accel run`: the full-compute reference and the configured stack on the same seeds, measured."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from accel import io, measure
from accel.distributed import is_main_process, process_state, wait_for_everyone
from accel.execute import (Evaluator, add_speedups, build_inputs, check_adapters_fit, load_embedded_model,
                           measure_plan, measure_stack, model_device, model_folder, plan_from, prepare_run,
                           reference_cache_key, reference_denoiser, reference_guidance)
from accel.recipe import to_yaml
from accel.report import format_table, markdown_table, save_grid


def run_recipe(recipe: DictConfig) -> dict | None:
    """Runs the reference and the configured stack, writes the outputs, returns the summary.

    Under `accelerate launch` the batches are split across processes; the main process
    measures, writes and returns the summary, the others return None.
    """
    prepare_run(recipe, "accel run")
    torch.manual_seed(recipe.inputs.seed)
    model = load_embedded_model(recipe.model.name, model_device(recipe))
    check_adapters_fit(recipe, model)
    denoiser = reference_denoiser(recipe, model)
    inputs = build_inputs(recipe)
    ref_plan = plan_from(recipe.eval.reference)
    cache_file = None
    if recipe.eval.cache_reference:
        key = reference_cache_key(recipe, ref_plan, model_folder(recipe.model.name))
        cache_file = Path(recipe.output.dir) / ".reference-cache" / f"{key}.safetensors"
    reference, ref_images = measure_plan("reference", "reference", ref_plan, denoiser, inputs, recipe,
                                         cache_file=cache_file, guidance_scale=reference_guidance(recipe))
    configured, run_images = measure_stack(recipe.name, recipe, model, inputs)
    configured["kind"] = "run"
    stack = configured.pop("stack")
    summary = None
    if is_main_process():
        print("\n".join(line for line in (stack["decisions"] or [])), flush=True)
        evaluate = Evaluator(recipe, inputs.labels)
        for record, images in ((reference, ref_images), (configured, run_images)):
            add_speedups(record, reference).update(evaluate(images, ref_images, record["label"]))
        summary = {"name": recipe.name, "num_processes": process_state().num_processes,
                   "runs": [reference, configured], "stack": stack,
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
    io.write_json(folder / "summary.json", summary, indent=2)
    io.write_text(folder / "recipe.yaml", to_yaml(recipe))
    io.write_json(folder / "stack.json", summary["stack"], indent=2, default=str)
    picked = _first_per_class(labels[:, None].float(), labels)[:, 0].long()
    save_grid([measure.to_unit_range(_first_per_class(ref_images, labels)),
               measure.to_unit_range(_first_per_class(run_images, labels))],
              ["reference", recipe.name], folder / "grid.png",
              column_titles=[str(int(c)) for c in picked])
    reference, run = summary["runs"]
    io.write_text(
        folder / "report.md",
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
