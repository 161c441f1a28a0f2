"""`accel ablate RECIPE`: a grid of stacks, always beside the reference and the equal-FLOPs baseline.

Every cell is one stack (the recipe with one value per axis) measured on the same seeds as the
full-compute reference. The plain fewer-steps family (each of `ablation.baseline_solvers` at each
of `ablation.baseline_steps`, no cache, no adapter) is always measured too, and every stack is
compared with the best of that family that spends no more FLOPs: `beats_equal_flops_baseline`.

Finished cells are appended to `cells.rank<R>.jsonl` (with their images) as they finish, so an
interrupted ablation resumes from them. Under `accelerate launch`, cells are dealt round-robin to
the processes and gathered through those files.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from accel import io
from accel.ablation_report import write_ablation_outputs
from accel.distributed import is_main_process, process_state, wait_for_everyone
from accel.execute import (Evaluator, add_speedups, check_adapters_fit, build_inputs, load_embedded_model, measure_plan,
                           measure_stack, model_device, plan_from, prepare_run, reference_denoiser,
                           reference_guidance, time_plan)
from accel.recipe.load import RecipeError
from accel.recipe.schema import Recipe
from accel.recipe.validate import validate_recipe
from accel.stack import StackError

FLOPS_TOLERANCE = 1.02  # a baseline within 2% of a stack's FLOPs counts as equal


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid.

    Attributes:
        key: a stable id of the overrides (resume key).
        label: a short human name.
        kind: "equal-flops-baseline" or "stack".
        overrides: recipe key -> value applied on top of the ablation recipe.
    """

    key: str
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
            value = f"{value['solver']} {value.get('steps')} steps {value.get('schedule', 'flow')}"
        parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts)


def _cell(kind: str, overrides: dict) -> Cell:
    key = hashlib.sha1(json.dumps([kind, overrides], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Cell(key=key, label=_label(overrides), kind=kind, overrides=overrides)


def grid_cells(recipe: DictConfig) -> list[Cell]:
    """The baseline family first, then the product of the axes."""
    ablation = recipe.ablation
    cells = [_cell("equal-flops-baseline", {"sampler.solver": solver, "sampler.steps": steps,
                                            "sampler.schedule": "flow", "cache": {"preset": None, "params": {}},
                                            "adapters": []})
             for solver in ablation.baseline_solvers for steps in ablation.baseline_steps
             if steps < recipe.eval.reference.steps]
    axes = OmegaConf.to_container(ablation.axes, resolve=True)
    for values in itertools.product(*axes.values()):
        cells.append(_cell("stack", dict(zip(axes.keys(), values))))
    return cells


def cell_config(recipe: DictConfig, cell: Cell) -> DictConfig:
    """The ablation recipe with the cell's overrides, typed but not yet validated.

    Raises:
        RecipeError: an axis value of the wrong type for its key.
    """
    result = copy.deepcopy(recipe)
    defaults = OmegaConf.structured(Recipe)
    for key, value in cell.overrides.items():
        try:
            if isinstance(value, dict):  # a whole section: start from its schema defaults, not the old values
                value = OmegaConf.merge(OmegaConf.select(defaults, key), value)
            OmegaConf.update(result, key, value, merge=False)
        except OmegaConfBaseException as error:
            raise RecipeError(f"ablation.axes.{key}: {value!r} does not fit: {io.first_line(error)}") from None
    return result


def cell_recipe(recipe: DictConfig, cell: Cell) -> DictConfig:
    """The ablation recipe with the cell's overrides, validated."""
    result = cell_config(recipe, cell)
    validate_recipe(result)
    return result


def family_of(record: dict) -> str:
    """sampler / cache / adapter / cache+adapter, from the resolved stack."""
    stack = record.get("stack", {}).get("stack", {})
    has_cache, has_adapter = stack.get("cache") is not None, bool(stack.get("adapters"))
    if has_cache and has_adapter:
        return "cache+adapter"
    return "cache" if has_cache else "adapter" if has_adapter else "sampler"


class CellStore:
    """Finished cells of one ablation folder: JSON lines per process, images as safetensors."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "cells").mkdir(parents=True, exist_ok=True)

    def finished(self) -> dict[str, dict]:
        """Finished records by cell key; a line cut short by an interruption is skipped (and said)."""
        records = {}
        for path in sorted(self.folder.glob("cells.rank*.jsonl")):
            for record in io.read_jsonl(path):
                if "key" in record:
                    records[record["key"]] = record
        return records

    def add(self, record: dict, images: torch.Tensor | None) -> None:
        if images is not None:
            io.save_safetensors(self.folder / "cells" / f"{record['key']}.safetensors", {"images": images})
        rank = process_state().process_index
        io.append_jsonl(self.folder / f"cells.rank{rank}.jsonl", record, default=str)

    def images(self, key: str) -> torch.Tensor | None:
        """The images saved for a cell (None when absent, or unreadable: said on stderr)."""
        path = self.folder / "cells" / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(path)["images"]
        except (SafetensorError, OSError, KeyError) as error:
            print(f"accel: {path} is unreadable ({io.first_line(error)}); measuring it again", file=sys.stderr,
                  flush=True)
            return None


def _reference(recipe, model, inputs, store: CellStore, retime: bool) -> tuple[dict, torch.Tensor]:
    """The reference record and images, measured once and kept for resumption. With `retime` (a
    resumed run that still has cells to measure) its wall-clock is timed anew, so those cells are
    compared with a reference timed on the same machine state; finished cells keep the speedups
    they were measured with."""
    path = store.folder / "reference.json"
    stored, stored_images = io.read_json(path), store.images("reference")
    if isinstance(stored, dict) and stored_images is not None:
        if retime:
            if is_main_process():
                stored["wall_seconds"] = time_plan(reference_denoiser(recipe, model),
                                                   plan_from(recipe.eval.reference), inputs, recipe)
                io.write_json(path, stored, default=str)
            wait_for_everyone()
            stored = io.read_json(path)
        return stored, stored_images
    record, images = measure_plan("reference", "reference", plan_from(recipe.eval.reference),
                                  reference_denoiser(recipe, model), inputs, recipe,
                                  guidance_scale=reference_guidance(recipe))
    if is_main_process():
        io.save_safetensors(store.folder / "cells" / "reference.safetensors", {"images": images})
        io.write_json(path, record, default=str)
    wait_for_everyone()
    return record, images


def _measure_cell(cell: Cell, recipe, model, inputs, reference, ref_images, evaluate):
    base = {"key": cell.key, "label": cell.label, "kind": cell.kind, "overrides": cell.overrides}
    try:
        record, images = measure_stack(cell.label, cell_recipe(recipe, cell), model, inputs, split=False)
    except (StackError, ValueError) as error:
        return {**base, "skipped": str(error)}, None
    record.update(base)
    add_speedups(record, reference).update(evaluate(images, ref_images, cell.label))
    record["family"] = family_of(record)
    return record, images


def run_ablation(recipe: DictConfig) -> list[dict] | None:
    """Runs (or resumes) the grid and writes the outputs; returns all records on the main process."""
    state = process_state()
    cells = grid_cells(recipe)
    for cell in cells:  # every axis value fits its key, before any work
        cell_config(recipe, cell)
    folder = prepare_run(recipe, "accel ablate")
    store = CellStore(folder)
    model = load_embedded_model(recipe.model.name, model_device(recipe))
    check_adapters_fit(recipe, model)
    inputs = build_inputs(recipe)
    done = store.finished()
    reference, ref_images = _reference(recipe, model, inputs, store, retime=any(c.key not in done for c in cells))
    evaluate = Evaluator(recipe, inputs.labels)
    mine = [c for i, c in enumerate(cells) if i % state.num_processes == state.process_index and c.key not in done]
    if is_main_process() and done:
        print(f"resuming: {len(done)} of {len(cells)} cells already finished", flush=True)
    for cell in tqdm(mine, desc="ablation", disable=not is_main_process()):
        record, images = _measure_cell(cell, recipe, model, inputs, reference, ref_images, evaluate)
        store.add(record, images)
    wait_for_everyone()
    if not is_main_process():
        return None
    reference = add_speedups(dict(reference), reference)
    reference.update(evaluate(ref_images, ref_images))
    finished = store.finished()
    records = [reference] + [finished[c.key] for c in cells if c.key in finished]
    mark_equal_flops_baselines(records)
    write_ablation_outputs(folder, recipe, records, store, inputs.labels)
    return records


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
