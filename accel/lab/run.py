"""`accel run`: the full-compute reference and the configured stack on the same seeds, measured.

Writes `<output.dir>/<name>/summary.json`, `report.md`, `grid.png` (reference row vs run row),
`recipe.yaml` and `stack.json`. The reference comes from the shared reference cache when an
identical earlier job made it (its wall-clock is timed anew beside this run); the run's own record
is reused when its fingerprint matches.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from accel.distributed import is_main_process, process_state, wait_for_everyone
from accel.io import write_json, write_text
from accel.lab.job import Configuration, Job, reference_configuration
from accel.lab.report import format_table, grid_picks, markdown_table, save_grid
from accel.recipe import to_yaml


def run_recipe(recipe: DictConfig) -> dict | None:
    """Runs the reference and the configured stack, writes the outputs, returns the summary.

    Under `accelerate launch` the batches are split across processes; the main process measures,
    writes and returns the summary, the others return None.
    """
    job = Job.open(recipe, "accel run")
    config = Configuration.from_recipe(recipe, label=recipe.name, kind="run")
    job.check([reference_configuration(recipe), config])
    reference, ref_images = job.reference()
    record, images = job.measure(config)
    summary = None
    if is_main_process():
        stack = record.get("stack") or {}
        print("\n".join(stack.get("decisions") or []), flush=True)
        reference = {**reference, "flops_speedup": 1.0, "wall_speedup": 1.0, **job.evaluator(ref_images, ref_images)}
        summary = {"name": recipe.name, "num_processes": process_state().num_processes,
                   "runs": [reference, record], "stack": stack,
                   "recipe": OmegaConf.to_container(recipe, resolve=True)}
        write_outputs(job, summary, ref_images, images)
    wait_for_everyone()
    return summary


def write_outputs(job: Job, summary: dict, ref_images, run_images) -> Path:
    """Writes summary.json, recipe.yaml, stack.json, report.md and grid.png under the job's folder."""
    recipe, folder = job.recipe, job.folder
    write_json(folder / "summary.json", summary, indent=2, default=str)
    write_text(folder / "recipe.yaml", to_yaml(recipe))
    write_json(folder / "stack.json", summary["stack"], indent=2, default=str)
    labels = job.inputs.label_tensor
    picks = grid_picks(labels, len(job.inputs), per_class=2)
    titles = [str(int(labels[i])) for i in picks] if labels is not None else None
    save_grid([ref_images[picks], run_images[picks]], ["reference", recipe.name], folder / "grid.png",
              column_titles=titles)
    reference, run = summary["runs"]
    describe = (run.get("stack") or {}).get("stack", {})
    write_text(folder / "report.md",
               f"# {recipe.name}\n\nReference: {reference['solver']} {reference['steps']} steps "
               f"({reference['schedule']}); run: {run['solver']} {run['steps']} steps ({run['schedule']}), cache "
               f"{(run.get('stack') or {}).get('cache_policy') or 'none'}, adapters "
               f"{len(describe.get('adapters') or [])}; model {job.model.name}; guidance {recipe.guidance.scale}, "
               f"{len(job.inputs)} samples, same seeds.\n\n{markdown_table(summary['runs'])}\n\n"
               f"![reference vs run](grid.png)\n\n## Resolved recipe\n\n```yaml\n{to_yaml(recipe)}```\n")
    print(format_table(summary["runs"]))
    print(f"\nwrote {folder}/summary.json, report.md, grid.png")
    return folder
