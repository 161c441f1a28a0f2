"""`accel ablate RECIPE`: a grid of stacks, always beside the reference and the equal-FLOPs baseline.

Every cell is one configuration (the recipe with one value per axis) measured on the same seeds as
the full-compute reference. The plain fewer-steps family (each of `ablation.baseline_solvers` at
each of `ablation.baseline_steps`, no cache, no adapter, on the recipe's schedule) is measured too,
and every stack is compared with the best of that family that spends no more FLOPs:
`beats_equal_flops_baseline`.

Cells are records of the job's RecordStore, keyed by the fingerprint of everything that determines
them, so an interrupted ablation resumes from its finished cells, and a rerun with other settings
(seed, guidance, inputs, model weights, code versions) measures its cells anew, saying which keys
differ. Every axis value is validated before any work. A cell that fails is reported on the console
and makes the command fail (exit 1) unless `--keep-going`. Under `accelerate launch` cells are
dealt round-robin to the processes.
"""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from accel import io
from accel.distributed import is_main_process, process_state, wait_for_everyone
from accel.lab.ablation_report import write_ablation_outputs
from accel.lab.fingerprint import fingerprint
from accel.lab.job import Configuration, Job, reference_configuration
from accel.recipe.load import RecipeError
from accel.recipe.schema import Recipe
from accel.recipe.validate import validate_recipe
from accel.stack import StackError

FLOPS_TOLERANCE = 1.02  # a baseline within 2% of a stack's FLOPs counts as equal


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: its kind ("equal-flops-baseline" or "stack"), a short label and
    the recipe keys it sets on top of the ablation recipe."""

    label: str
    kind: str
    overrides: dict


def _label(overrides: dict) -> str:
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict) and "preset" in value:
            params = ",".join(f"{k}={v}" for k, v in (value.get("params") or {}).items())
            value = "none" if value["preset"] is None else value["preset"] + (f"({params})" if params else "")
        elif isinstance(value, dict) and "solver" in value:  # a whole sampler section
            value = f"{value['solver']} {value.get('steps')} steps {value.get('schedule', 'auto')}"
        elif isinstance(value, list) and key == "adapters":
            value = "+".join(str(a.get("path", "")).rstrip("/").split("/")[-1] for a in value) or "none"
        parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts)


def grid_cells(recipe: DictConfig) -> list[Cell]:
    """The baseline family first, then the product of the axes."""
    ablation = recipe.ablation
    cells = []
    for solver in ablation.baseline_solvers:
        for steps in ablation.baseline_steps:
            if steps < recipe.eval.reference.steps:
                overrides = {"sampler.solver": solver, "sampler.steps": steps, "sampler.schedule_params": {},
                             "sampler.solver_params": {}, "cache": {"preset": None, "params": {}}, "adapters": []}
                cells.append(Cell(f"{solver} {steps} steps", "equal-flops-baseline", overrides))
    axes = OmegaConf.to_container(ablation.axes, resolve=True)
    for values in itertools.product(*axes.values()):
        overrides = dict(zip(axes.keys(), values))
        cells.append(Cell(_label(overrides), "stack", overrides))
    return cells


def _typed(defaults: DictConfig, key: str, value):
    """An axis value merged onto its schema node, so sections and lists of sections get their types."""
    node = OmegaConf.select(defaults, key)
    if isinstance(value, dict) and isinstance(node, DictConfig):
        return OmegaConf.merge(node, value)  # a whole section starts from its schema defaults
    element = getattr(getattr(node, "_metadata", None), "element_type", None)
    if isinstance(value, list) and isinstance(node, ListConfig) and isinstance(element, type):
        return [OmegaConf.merge(OmegaConf.structured(element), item) for item in value]
    return value


def cell_recipe(recipe: DictConfig, cell: Cell) -> DictConfig:
    """The ablation recipe with the cell's overrides, validated.

    Raises:
        RecipeError: an axis value that does not fit its key.
    """
    result = copy.deepcopy(recipe)
    defaults = OmegaConf.structured(Recipe)
    for key, value in cell.overrides.items():
        try:
            OmegaConf.update(result, key, _typed(defaults, key, value), merge=False)
        except OmegaConfBaseException as error:
            raise RecipeError(f"ablation.axes.{key}: {value!r} does not fit: {io.first_line(error)}") from None
    try:
        validate_recipe(result)
    except RecipeError as error:
        raise RecipeError(f"ablation cell {cell.label!r}: {error}") from None
    return result


def family_of(record: dict) -> str:
    """sampler / cache / adapter / cache+adapter, from the resolved stack."""
    stack = (record.get("stack") or {}).get("stack", {})
    has_cache, has_adapter = stack.get("cache") is not None, bool(stack.get("adapters"))
    if has_cache and has_adapter:
        return "cache+adapter"
    return "cache" if has_cache else "adapter" if has_adapter else "sampler"


def run_ablation(recipe: DictConfig, keep_going: bool = False) -> tuple[list[dict] | None, list[str]]:
    """Runs (or resumes) the grid and writes the outputs.

    Returns:
        (all records on the main process, None elsewhere; the one-line reasons of failed cells).
    """
    cells = grid_cells(recipe)
    recipes = {cell.label + cell.kind: cell_recipe(recipe, cell) for cell in cells}  # all valid before any work
    state = process_state()
    job = Job.open(recipe, "accel ablate")
    configs = [Configuration.from_recipe(recipes[c.label + c.kind], label=c.label, kind=c.kind, overrides=c.overrides)
               for c in cells]
    job.check([reference_configuration(recipe)])
    job.check(configs, resolve_stacks=False)  # adapters fit; a cell that cannot resolve fails on its own
    reference, ref_images = job.reference()
    if is_main_process():
        job.report_resumption(configs)
    mine = [c for i, c in enumerate(configs) if i % state.num_processes == state.process_index]
    failures: list[str] = []
    for config in tqdm(mine, desc="ablation", disable=None if is_main_process() else True):
        try:
            job.measure(config, split=False)
        except (StackError, ValueError) as error:
            failures.append(f"{config.label}: {io.first_line(error)}")
            print(f"accel: cell {config.label!r} failed: {io.first_line(error)}", file=sys.stderr, flush=True)
            if not keep_going:
                break
            continue
    wait_for_everyone()
    if not is_main_process():
        return None, failures
    job.store.reload()
    rows = [{**reference, "flops_speedup": 1.0, "wall_speedup": 1.0, **job.evaluator(ref_images, ref_images)}]
    for config in configs:  # in grid order, each by the fingerprint of this run's settings
        record = job.store.get(fingerprint(job.payload_of(config)))
        if record is not None:
            rows.append({**record, "family": family_of(record)})
    mark_equal_flops_baselines(rows)
    write_ablation_outputs(job, rows)
    return rows, failures


def mark_equal_flops_baselines(records: list[dict]) -> None:
    """Sets `beats_equal_flops_baseline` (and the baseline it was compared with) on each stack.

    The comparison baseline is the best-PSNR plain run spending at most the stack's FLOPs (within
    2%); where every baseline costs more, the cheapest one (a comparison that favours the baseline).
    """
    baselines = [r for r in records if r["kind"] == "equal-flops-baseline" and "psnr" in r]
    for record in records:
        record.setdefault("beats_equal_flops_baseline", None)
        if record["kind"] != "stack" or "psnr" not in record or not baselines:
            continue
        eligible = [b for b in baselines if b["flops"] <= record["flops"] * FLOPS_TOLERANCE]
        best = max(eligible, key=lambda b: b["psnr"]) if eligible else min(baselines, key=lambda b: b["flops"])
        record["equal_flops_baseline"] = {"label": best["label"], "psnr": best["psnr"], "fd": best.get("fd"),
                                          "flops_speedup": best["flops_speedup"]}
        record["beats_equal_flops_baseline"] = bool(record["psnr"] > best["psnr"])
