"""`accel calibrate RECIPE`: searches what a recipe marks `calibrated`, on samples never evaluated.

Every search trial runs the *pipeline*: the recipe's stack, with the trial's values in place of the
markers, is applied with `accel.apply` and generates the calibration samples (seeds offset by
`CALIBRATION_SEED_OFFSET`, prompts from `calibrate.prompts` or the recipe's); its error is the mean
per-sample log MSE against the recipe's reference (`eval.reference`) on the same samples. So the
searches run on any pipeline the lab loads, with the resolver's rules, the branch hooks and the
scheduler exactly as `accel run` uses them. In order:

1. the sampler's walk (`sampler.schedule_params.path: calibrated`, schedule `optimized`): the
   coordinate descent and golden-section search of `samplers.optimized`, starting from the
   pipeline's own walk, with the compensation ratios after it (`sampler.solver_params.compensation`);
2. TeaCache's coefficients / MagCache's ratios (`caching.calibrate_teacache` / `calibrate_magcache`
   recording a full-compute run of the pipeline);
3. a cache's computed steps (`cache.params.steps: calibrated K`, `caching.search_compute_steps`)
   and then its forecast gains (`cache.params.gains: calibrated`, `caching.search_forecast_gains`).

Each trial's error is appended to `calibrations/<name>.trials.jsonl`, keyed by a fingerprint of the
trial and the provenance, and replayed on a rerun (a killed calibrate continues where it stopped;
the reference is generated only when a trial is missing). The result is one file,
`calibrations/<name>.json` (`accel.calibration.Calibration`). Under `accelerate launch` every
process runs the same search and each trial's batches are dealt to the processes and gathered
(`accel.distributed.map_batches`), so the result is the single-process one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import accel
from accel.calibration import (COMPENSATION_KEY, WALK_KEY, Calibration, CalibrationError, calibration_prompts,
                               check_markers, marker_budget, provenance_of, replace_markers)
from accel.distributed import batch_slices, is_main_process, map_batches, wait_for_everyone
from accel.io import append_jsonl, read_jsonl
from accel.lab.fingerprint import fingerprint, model_identity
from accel.lab.generate import _call as call_pipeline
from accel.lab.inputs import CALIBRATION_SEED_OFFSET, Inputs, build_inputs
from accel.lab.job import reference_configuration
from accel.lab.models import LabModel, load_model
from accel.stack import Stack

CACHE_KEYS = ("cache.params.coefficients", "cache.params.ratios", "cache.params.steps", "cache.params.gains")
WALK_SEARCH = {"sweeps": 3, "iterations": 6, "margin": 0.05}  # samplers.optimize_schedule's defaults
RATIO_SEARCH = {"sweeps": 2, "iterations": 6, "width": 1.0, "penalty": 0.2}


def calibration_inputs(recipe: DictConfig, embedded: bool) -> Inputs:
    """The calibration samples: `calibrate.samples` prompts (or classes) and seeds offset from every
    evaluated one; resolution, frames and call arguments as the recipe's inputs."""
    section = OmegaConf.to_container(recipe.inputs, resolve=True)
    section.update(seed=int(recipe.calibrate.seed), samples_per_class=1, samples_per_prompt=1, prompt_file=None)
    section["classes" if embedded else "prompts"] = calibration_prompts(recipe, embedded)
    return build_inputs(OmegaConf.create(section), embedded, CALIBRATION_SEED_OFFSET)


def log_errors(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean per-sample log MSE, mean MSE) of images against the reference; inf for non-finite images."""
    errors = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    if not torch.isfinite(errors).all():
        return math.inf, math.inf
    return float(errors.clamp_min(1e-20).log().mean()), float(errors.mean())


class Session:
    """One calibration: the model, samples, reference, journal and the values found so far.

    Args:
        recipe: the recipe with its markers.
        model: the loaded pipeline.
        journal: the JSONL file of measured trials.
    """

    def __init__(self, recipe: DictConfig, model: LabModel, journal: Path) -> None:
        self.recipe, self.model, self.journal = recipe, model, journal
        self.markers = check_markers(recipe)
        self.provenance = provenance_of(recipe, model_identity(model.pipe))
        self.inputs = calibration_inputs(recipe, model.is_embedded)
        self.done = {r["key"]: r for r in read_jsonl(journal) if "key" in r}
        self.values: dict[str, Any] = {}
        self.search: dict[str, dict] = {}
        self.measured = self.replayed = 0
        self._reference: torch.Tensor | None = None
        self.bar = tqdm(desc=f"calibrate {recipe.name}", unit="trial", disable=None if is_main_process() else True)

    def trial_recipe(self, trial: dict[str, Any], *, keep_cache: bool = True) -> DictConfig:
        """The recipe with the values found so far and the trial's in place; markers still to search
        are left out (their keys dropped, or the whole cache for a walk search with `keep_cache` False)."""
        recipe = replace_markers(self.recipe, {**self.values, **trial})
        pending = [key for key in self.markers if key not in self.values and key not in trial]
        for key in pending:
            section, name = key.rsplit(".", 1)
            node = OmegaConf.select(recipe, section)
            if name in node:
                node.pop(name)
        if not keep_cache:
            recipe.cache.preset, recipe.cache.params = None, {}
        return recipe

    def generate(self, stack: Stack | None, steps: int, guidance: Any, *, split: bool = True,
                 keep_walk: bool = False) -> tuple[torch.Tensor, list[float] | None]:
        """(images, the walk the scheduler took if asked) of the calibration samples under `stack`
        (None: the pipeline as loaded). Unsplit runs generate every batch on every process."""
        pipe, walk = self.model.pipe, None
        if stack is not None:
            accel.apply(pipe, stack)
        try:
            slices = batch_slices(len(self.inputs), int(self.recipe.inputs.batch_size))
            work = lambda piece: call_pipeline(self.model, self.inputs, piece, steps, guidance)  # noqa: E731
            parts = map_batches(work, slices) if split else [work(piece) for piece in slices]
            if keep_walk and stack is not None:
                walk = [float(s) for s in accel.pipeline.applied(pipe).accel_scheduler.solver_sigmas]
        finally:
            if stack is not None:
                accel.remove(pipe)
        return torch.cat(parts), walk

    @property
    def reference(self) -> torch.Tensor:
        """The reference images of the calibration samples (generated on first use)."""
        if self._reference is None:
            config = reference_configuration(self.recipe)
            self._reference, _ = self.generate(config.stack, config.steps, config.guidance)
        return self._reference

    def trial_key(self, stack: Stack, search: str, keep_walk: bool = False) -> str:
        """The journal key of a trial: what it runs (the whole stack, a walk file by its content-named
        file), on which weights and samples, against which reference, with which code. Trials of other
        recipes that run the same stack share a key, so one journal serves several calibrations."""
        described = stack.to_dict()
        path = described["sampler"]["schedule_params"].get("path")
        if path:
            described["sampler"]["schedule_params"]["path"] = Path(path).name
        return fingerprint({"stack": described, "search": search, "walk": keep_walk,
                            "model": self.provenance["model"], "samples": self.inputs.describe(),
                            "batch_size": int(self.recipe.inputs.batch_size),
                            "reference": self.provenance["reference"], "versions": self.provenance["versions"]})

    def measure(self, search: str, trial: dict[str, Any], *, keep_cache: bool = True,
                keep_walk: bool = False) -> dict:
        """The journaled record of one trial ({objective, mse, walk}), measured if not journaled."""
        stack = Stack.from_recipe(self.trial_recipe(trial, keep_cache=keep_cache))
        key = self.trial_key(stack, search, keep_walk)
        record = self.done.get(key)
        if record is not None:
            self.replayed += 1
            self.bar.update()
            return record
        images, walk = self.generate(stack, stack.sampler.steps, stack.guidance, split=not keep_walk,
                                     keep_walk=keep_walk)
        objective, mse = log_errors(images, self.reference)
        record = {"key": key, "search": search, "trial": _compact(trial), "objective": objective, "mse": mse,
                  "walk": walk}
        if is_main_process():
            append_jsonl(self.journal, record)
        self.done[key] = record
        self.measured += 1
        self.bar.update()
        return record

    def found(self, key: str, value: Any, summary: dict) -> None:
        """Keeps a searched value and its search summary (with the journaled trials of its search)."""
        self.values[key] = value
        trials = [{"trial": r["trial"], "objective": r["objective"]} for r in self.done.values()
                  if r.get("search") == summary.get("search", key) and "objective" in r]
        self.search[key] = {**summary, "trial_log": trials}
        if is_main_process():
            self.bar.write(f"{key}: {summary.get('line', '')}")


def _compact(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial for the log: a walk by its levels."""
    return {key: value["sigmas"] if key == WALK_KEY and isinstance(value, dict) else value
            for key, value in trial.items()}


class _WalkObjective:
    """`samplers.optimized`'s search interface (`denoiser.schedule`, `__call__(sigmas)`,
    `set_ratios`) over whole pipeline runs of the recipe's stack with the candidate walk."""

    def __init__(self, session: Session, schedule: Any, search_walk: bool) -> None:
        self.session, self.search_walk = session, search_walk
        # a cache still to calibrate is left out of the walk's trials; a given one runs with them
        self.keep_cache = not any(key.startswith("cache.") for key in session.markers)
        self.denoiser = SimpleNamespace(schedule=schedule)
        self.ratios: list[float] | None = None
        sampler = session.recipe.sampler
        self.solver, self.steps = str(sampler.solver), int(sampler.steps)

    def walk(self, sigmas: torch.Tensor, **fields: Any) -> dict:
        """The walk as a `samplers.OptimizedSchedule` dict."""
        import dataclasses

        from samplers import get_solver
        from samplers.schedules import OptimizedSchedule

        stored = OptimizedSchedule(sigmas=[float(s) for s in sigmas], solver=self.solver,
                                   nfe=get_solver(self.solver).nfe(self.steps), family=self.denoiser.schedule.name,
                                   error=fields.pop("error", 0.0), initial_error=fields.pop("initial_error", 0.0),
                                   initial_schedule="auto", reference=fields)
        return dataclasses.asdict(stored)

    def trial(self, sigmas: torch.Tensor) -> dict[str, Any]:
        trial: dict[str, Any] = {WALK_KEY: self.walk(sigmas)} if self.search_walk else {}
        if self.ratios is not None:
            trial[COMPENSATION_KEY] = [float(r) for r in self.ratios]
        return trial

    def __call__(self, sigmas: torch.Tensor) -> float:
        value = self.session.measure("walk", self.trial(sigmas), keep_cache=self.keep_cache)["objective"]
        if self.ratios is not None:
            value += math.log1p(RATIO_SEARCH["penalty"] * sum(r * r for r in self.ratios))
        return value

    def set_ratios(self, ratios: list[float]) -> "_WalkObjective":
        self.ratios = list(ratios)
        return self


def _model_schedule(pipe: Any) -> Any:
    """The pipeline's noise schedule (flow time or VP), as AccelScheduler reads it from its config."""
    from samplers.diffusers_scheduler import AccelScheduler

    config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    return AccelScheduler.from_config(config, solver="euler", schedule="auto").model_schedule


def search_walk(session: Session) -> None:
    """The optimised walk and/or its compensation ratios, as `samplers.optimize_schedule` searches them."""
    from samplers.optimized import _coordinate_descent, _search_ratios

    search_walk_too = WALK_KEY in session.markers
    objective = _WalkObjective(session, _model_schedule(session.model.pipe), search_walk_too)
    start = {"sampler.schedule": "auto", "sampler.schedule_params": {}} if search_walk_too else {}
    first = session.measure("walk", start, keep_cache=objective.keep_cache, keep_walk=True)
    sigmas = torch.tensor(first["walk"], dtype=torch.float64)
    lines: list[str] = []
    best = first["objective"]
    if search_walk_too:
        sigmas, best = _coordinate_descent(objective, sigmas, objective(sigmas), WALK_SEARCH["sweeps"],
                                           WALK_SEARCH["iterations"], WALK_SEARCH["margin"], lines.append)
        final = session.measure("walk", objective.trial(sigmas), keep_cache=objective.keep_cache)
        value = objective.walk(sigmas, error=final["mse"], initial_error=first["mse"], solver="eval.reference",
                               samples=len(session.inputs), objective="psnr", objective_value=final["objective"])
        session.found(WALK_KEY, value, {"search": "walk", "objective": final["objective"], "line": (
            f"walk of {len(sigmas) - 1} steps, log MSE {first['objective']:.4f} -> {final['objective']:.4f}"),
            "initial_objective": first["objective"], "log": list(lines)})
    if COMPENSATION_KEY in session.markers:
        ratios, best = _search_ratios(objective, sigmas, RATIO_SEARCH["sweeps"], RATIO_SEARCH["iterations"],
                                      RATIO_SEARCH["width"], lines.append)
        objective.set_ratios(ratios)
        final = session.measure("walk", objective.trial(sigmas), keep_cache=objective.keep_cache)
        session.found(COMPENSATION_KEY, [float(r) for r in ratios], {
            "search": "walk", "objective": final["objective"], "initial_objective": first["objective"],
            "line": f"compensation ratios, log MSE {first['objective']:.4f} -> {final['objective']:.4f}",
            "log": list(lines)})


def calibrate_trigger(session: Session, key: str) -> None:
    """TeaCache's coefficients or MagCache's ratios, recorded from a full-compute run of the pipeline."""
    from accel.pipeline import run_info_for
    from accel.resolve import resolve
    from caching import calibrate_magcache, calibrate_teacache

    stack = Stack.from_recipe(session.trial_recipe({}))
    journal_key = session.trial_key(stack, key)
    record = session.done.get(journal_key)
    if record is None:
        config = resolve(stack, run_info_for(session.model.pipe, stack)).cache_config()
        bare = stack.replace(cache=None)
        run = lambda: session.generate(bare, bare.sampler.steps, bare.guidance, split=False)  # noqa: E731
        denoiser, quiet = session.model.denoiser, logging.getLogger("caching")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # not "the first generation calibrates": this run is the calibration
        try:
            if key.endswith("coefficients"):
                value = list(calibrate_teacache(denoiser, run, degree=getattr(config.trigger, "degree", 4),
                                                scope=config.scope).coefficients)
            else:
                value = list(calibrate_magcache(denoiser, run, scope=config.scope).ratios)
        finally:
            quiet.setLevel(level)
        session.measured += 1
        record = {"key": journal_key, "search": key, "trial": {}, "value": value}
        if is_main_process():
            append_jsonl(session.journal, record)
        session.done[journal_key] = record
    else:
        session.replayed += 1
    session.found(key, record["value"], {"search": key, "line": f"{len(record['value'])} values from one "
                                         f"full-compute run of {len(session.inputs)} samples"})


def search_cache(session: Session) -> None:
    """The cache's computed steps, then its forecast gains."""
    from caching import search_compute_steps, search_forecast_gains

    recipe, lines = session.recipe, []
    if "cache.params.steps" in session.markers:
        budget = marker_budget("cache.params.steps", session.markers["cache.params.steps"])
        steps = int(recipe.sampler.steps)
        initial = sorted({round(i * steps / budget) for i in range(budget)})
        trial = lambda f: session.measure("cache.params.steps", {"cache.params.steps": list(f)})["objective"]  # noqa
        found = search_compute_steps(None, lambda f: f, None, None, initial, steps, trial=trial, log=lines.append)
        session.found("cache.params.steps", list(found.fractions()), {
            "objective": found.objective, "initial_objective": found.initial_objective, "trials": found.trials,
            "steps": list(found.steps), "log": list(lines),
            "line": f"{budget} computed steps at {list(found.steps)}, log MSE {found.initial_objective:.4f} -> "
                    f"{found.objective:.4f} ({found.trials} trials)"})
    if "cache.params.gains" in session.markers:
        lines = []
        fractions = list(session.values.get("cache.params.steps") or recipe.cache.params.steps)
        trial = lambda g: session.measure("cache.params.gains", {"cache.params.steps": fractions,  # noqa: E731
                                                                 "cache.params.gains": list(g)})["objective"]
        found = search_forecast_gains(None, lambda g: g, None, None, len(fractions) - 1, trial=trial,
                                      log=lines.append)
        session.found("cache.params.gains", list(found.gains), {
            "objective": found.objective, "initial_objective": found.initial_objective, "trials": found.trials,
            "log": list(lines), "line": f"gains {list(found.gains)}, log MSE {found.initial_objective:.4f} -> "
                                        f"{found.objective:.4f} ({found.trials} trials)"})


def calibration_path(recipe: DictConfig, out_dir: Path | None = None) -> Path:
    """Where `accel calibrate` writes the recipe's file: <out or working directory>/calibrations/<name>.json."""
    return Path(out_dir or ".") / "calibrations" / f"{recipe.name}.json"


def calibrate_recipe(recipe: DictConfig, out_dir: Path | None = None, *, model: LabModel | None = None,
                     journal: Path | None = None) -> Path:
    """Searches every marked value of `recipe` and writes its calibration file.

    Args:
        recipe: a recipe loaded with its markers (`load_recipe(..., calibrated=False)`).
        out_dir: the folder holding `calibrations/` (default: the working directory).
        model: the loaded pipeline (default: loaded from `model.name`).
        journal: the trials journal (default: `calibrations/<name>.trials.jsonl` beside the file).

    Returns:
        The calibration file's path.

    Raises:
        CalibrationError: nothing is marked calibrated.
    """
    if not check_markers(recipe):
        raise CalibrationError(f"recipe {recipe.name} marks nothing calibrated; mark a value, e.g. "
                               "cache.params.steps='calibrated 6' (see docs/recipes.md, Calibration)")
    path = calibration_path(recipe, out_dir)
    journal = journal or path.with_suffix(".trials.jsonl")
    session = Session(recipe, model or load_model(recipe.model), journal)
    if WALK_KEY in session.markers or COMPENSATION_KEY in session.markers:
        search_walk(session)
    for key in ("cache.params.coefficients", "cache.params.ratios"):
        if key in session.markers:
            calibrate_trigger(session, key)
    search_cache(session)
    session.bar.close()
    if is_main_process():
        Calibration(str(recipe.name), dict(session.markers), session.values, session.provenance,
                    session.search).write(path)
        print(f"calibrated {', '.join(session.markers)}: {session.measured} trials or calibration runs measured, "
              f"{session.replayed} replayed from {journal.name}\nwrote {path}")
    wait_for_everyone()
    return path
