"""`accel bench samplers`: our solvers and schedules against diffusers' own schedulers and against the
fewer-steps baseline, on both embedded models, at NFE 4, 6, 8, 10, 15 and 20.

Each model (the flow model `flux-digits`, the epsilon UNet `unet-digits`) is a diffusers pipeline
and one lab `Job`: every configuration is a `Configuration` over it, generated through the pipeline
on the same seeded noise and labels with classifier-free guidance, scored by the lab's `Evaluator`
against the job's reference (a 200-step Heun of the same seeds: uniform t for the flow model,
Karras sigmas for the UNet) and stored in the job's `RecordStore` under its fingerprint, so a rerun
measures only what changed. Three kinds of configurations:

* **equal-flops-baseline**: DPM-Solver++(2M) and UniPC on the pipeline's own walk (`schedule: auto`)
  at every NFE: the best solver a user gets without our walks, which every plot shows as the frontier;
* **stack** (origin `accel`): our solvers on our named schedules and on optimised walks, through
  `accel.apply`;
* **anchor** (origin `diffusers`): diffusers' schedulers, configured as diffusers' pipelines use
  them, swapped into the pipeline by the configuration's `install`.

Optimised walks are searched on calibration seeds that the evaluation never uses; the shipped walks
(`<weights>/schedules/`) are reused when their provenance matches, new searches are saved under
`<out_dir>/calibrations/<model>/schedules/` and reused from there.

    accel bench samplers --quick --json runs/samplers.json

Outputs under out_dir: samplers.json (records, comparison per NFE, skipped configurations, settings),
samplers.md (the tables), samplers-<model>.png (the Pareto plots) and one job folder per model
(<model>/: the records and images a rerun reuses). ACCEL_BENCH_FLUX_DIR / ACCEL_BENCH_UNET_DIR
point at other weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import samplers
from accel.bench import _samplers_report as report
from accel.bench._samplers_diffusers import anchor_configuration, configs_for
from accel.bench._samplers_models import SETUPS, BenchModel, ModelSetup, Reference, bench_model
from accel.bench._samplers_optimized import Calibration, Calibrator, walk_digest
from accel.lab.inputs import Inputs, sample_seed
from accel.lab.job import Configuration, Job
from accel.lab.records import RecordStore
from accel.stack import GuidancePlan, SamplerPlan, Stack

COMMAND = "accel bench samplers"
MODELS = ("flux-digits", "unet-digits")
NFES = (4, 6, 8, 10, 15, 20)
BASELINE_SOLVERS = ("dpmpp_2m", "unipc_bh2")
MODEL_ENV = {"flux-digits": "ACCEL_BENCH_FLUX_DIR", "unet-digits": "ACCEL_BENCH_UNET_DIR"}


@dataclass(frozen=True)
class Settings:
    """What one run sweeps and how many samples it measures.

    Attributes:
        samples: evaluation samples per configuration (sample i: seed `sample_seed(seed, i)`, label i mod 10).
        seed: base seed of the evaluation samples.
        batch_size: samples per pipeline call.
        nfes: NFE budgets (model evaluations per guidance branch).
        real_samples: real images for the FD statistics.
        ours: per model name, our configurations as "solver/schedule" (schedule "optimized" included);
            None, or a model missing from it: every solver on every schedule of its family and an
            optimised schedule for each solver.
        optimize_nfes: NFE budgets that get an optimised schedule (None: all of `nfes`).
        diffusers: diffusers settings as "Solver/schedule" (None: all).
        baselines: the solvers of the fewer-steps baseline, on the pipeline's own walk.
        calibration: the calibration set of the optimised schedules.
        workers: single-thread processes sharing the models' work (1: everything in this process).
        model_dirs: per model name, its pipeline folder (default: ACCEL_BENCH_FLUX_DIR /
            ACCEL_BENCH_UNET_DIR, else the shipped weights).
        timing_batch, timing_repeats: the wall-clock timing of each configuration (after one warm-up).
        models: the models to measure.
        references: per model name, another fine-step reference than its setup's (tests).
    """

    samples: int = 200
    seed: int = 0
    batch_size: int = 50
    nfes: tuple[int, ...] = NFES
    real_samples: int = 2000
    ours: dict[str, tuple[str, ...]] | None = None
    optimize_nfes: tuple[int, ...] | None = None
    diffusers: tuple[str, ...] | None = None
    baselines: tuple[str, ...] = BASELINE_SOLVERS
    calibration: Calibration = field(default_factory=Calibration)
    workers: int = 2
    model_dirs: dict[str, str] | None = None
    timing_batch: int = 10
    timing_repeats: int = 3
    models: tuple[str, ...] = MODELS
    references: dict[str, Reference] | None = None


FULL = Settings()
# The quick sweep keeps every NFE, every diffusers setting and the baseline; of ours it keeps each
# solver family's best schedules on the calibration seeds, and optimises one solver per model at
# NFE 6 and 8. Wall-clock is one timed call of one sample (read the FLOPs for speed).
QUICK = Settings(
    samples=30, batch_size=30, real_samples=1000, optimize_nfes=(6, 8), timing_batch=1, timing_repeats=1,
    ours={"flux-digits": ("euler/flux", "heun/flux", "dpmpp_2m/flux", "dpmpp_3m/flux", "unipc_bh2/flux",
                          "ipndm/flux", "unipc_bh2/optimized"),
          "unet-digits": ("euler/karras", "heun/karras", "dpmpp_2m/logsnr", "dpmpp_3m/logsnr", "unipc_bh2/karras",
                          "unipc_bh2/logsnr", "unipc_bh2/timestep", "ipndm/logsnr", "unipc_bh2/optimized")})


@dataclass(frozen=True)
class Planned:
    """One configuration of the sweep and what the bench's tables call it.

    Attributes:
        config: the lab configuration.
        identity: model, origin ("baseline", "accel" or "diffusers"), solver, schedule, nfe (per
            guidance branch) and family (the Pareto plot's colour).
    """

    config: Configuration
    identity: dict


def model_source(name: str, settings: Settings) -> str:
    """What the job's `model.name` is: a folder from the settings or the environment, else the name."""
    given = (settings.model_dirs or {}).get(name) or os.environ.get(MODEL_ENV[name])
    return str(given) if given else name


def model_setup(name: str, settings: Settings) -> ModelSetup:
    """What the bench fixes for a model, with the settings' reference where they give one."""
    given = (settings.references or {}).get(name)
    return dataclasses.replace(SETUPS[name], reference=given) if given else SETUPS[name]


def bench_recipe(name: str, settings: Settings, out_dir: Path) -> DictConfig:
    """The job's recipe: the embedded demo with this model, its guidance, reference and metrics."""
    from accel.recipe import load_recipe

    setup = model_setup(name, settings)
    reference = setup.reference
    return load_recipe("embedded-demo", [
        f"name={name}", f"model.name={model_source(name, settings)}", f"guidance.scale={setup.guidance}",
        "sampler.schedule=auto", f"inputs.seed={settings.seed}", f"inputs.batch_size={settings.batch_size}",
        f"inputs.samples_per_class={math.ceil(settings.samples / 10)}",
        f"eval.reference.solver={reference.solver}", f"eval.reference.steps={reference.steps}",
        f"eval.reference.schedule={reference.schedule}", f"eval.reference.guidance_scale={setup.guidance}",
        "eval.metrics=[psnr,ssim,fd,accuracy]", f"eval.real_samples={settings.real_samples}",
        f"eval.timing_batch={settings.timing_batch}", f"eval.timing_repeats={settings.timing_repeats}",
        f"output.dir={Path(out_dir) / name}"])  # the model's own reference cache: one writer per model


def bench_inputs(settings: Settings) -> Inputs:
    """Sample i: seed `sample_seed(seed, i)`, label i mod 10 (classes interleaved, as before the lab)."""
    count = settings.samples
    return Inputs(tuple(sample_seed(settings.seed, i) for i in range(count)),
                  labels=tuple(i % 10 for i in range(count)))


def open_job(name: str, settings: Settings, out_dir: Path, rank: int = 0) -> tuple[Job, BenchModel]:
    """The lab job of one model (folder `<out_dir>/<model>`, records appended by process `rank`)."""
    job = Job.open(bench_recipe(name, settings, out_dir), COMMAND, folder=Path(out_dir) / name)
    job.inputs = bench_inputs(settings)
    job.store = RecordStore(job.folder, rank)
    return job, bench_model(model_setup(name, settings), job.model)


def _our_pairs(subject: BenchModel, settings: Settings) -> list[tuple[str, str]]:
    """(solver, schedule) pairs of ours for this model, in sweep order."""
    if settings.ours is not None and subject.name in settings.ours:
        return [tuple(pair.split("/")) for pair in settings.ours[subject.name]]
    fits = []
    for name, spec in samplers.SOLVERS.items():
        try:
            spec.check_fits(subject.denoiser.prediction_type, subject.family)
        except ValueError:
            continue
        fits += [(name, schedule) for schedule in [*subject.schedules, "optimized"]]
    return fits


def _sampler(subject: BenchModel, solver: str, steps: int, schedule: str, params: dict, label: str, kind: str,
             identity: dict | None = None) -> Configuration:
    guidance = GuidancePlan(subject.guidance)
    stack = Stack(SamplerPlan(solver, steps, schedule, params), guidance=guidance)
    return Configuration(label, kind, stack, steps, guidance, identity=identity or {})


def _ours(subject: BenchModel, settings: Settings, calibrator: Calibrator, skipped: list[str]) -> list[Planned]:
    planned = []
    for solver, schedule in _our_pairs(subject, settings):
        for nfe in settings.nfes:
            try:
                steps = samplers.get_solver(solver).steps_for_nfe(nfe)
            except ValueError as error:
                skipped.append(f"{subject.name} accel {solver}/{schedule} NFE {nfe}: {error}")
                continue
            if schedule == "optimized" and nfe not in (settings.optimize_nfes or settings.nfes):
                continue
            params, walk = dict(subject.schedules.get(schedule, {})), {}
            if schedule == "optimized":  # searched now if no saved walk fits
                path = calibrator.get(solver, nfe)
                params, walk = {"path": str(path)}, {"walk_sha256": walk_digest(path)}
            config = _sampler(subject, solver, steps, schedule, params, f"accel {solver}/{schedule} NFE {nfe}",
                              "stack", walk)
            planned.append(Planned(config, _identity(subject, "accel", solver, schedule, nfe, "sampler")))
    return planned


def _baselines(subject: BenchModel, settings: Settings) -> list[Planned]:
    planned = []
    for solver in settings.baselines:
        for nfe in settings.nfes:
            steps = samplers.get_solver(solver).steps_for_nfe(nfe)
            config = _sampler(subject, solver, steps, "auto", {}, f"baseline {solver}/auto NFE {nfe}",
                              "equal-flops-baseline")
            planned.append(Planned(config, _identity(subject, "baseline", solver, "auto", nfe, "sampler")))
    return planned


def _anchors(subject: BenchModel, settings: Settings, skipped: list[str]) -> list[Planned]:
    planned = []
    for setting in configs_for(subject.family):
        if settings.diffusers is not None and f"{setting.solver}/{setting.schedule}" not in settings.diffusers:
            continue
        for nfe in settings.nfes:
            try:
                config = anchor_configuration(setting, nfe, subject.betas(), subject.guidance)
            except ValueError as error:
                skipped.append(f"{subject.name} diffusers {setting.solver}/{setting.schedule} NFE {nfe}: {error}")
                continue
            planned.append(Planned(config, _identity(subject, "diffusers", setting.solver, setting.schedule, nfe,
                                                     "anchor")))
    return planned


def _identity(subject: BenchModel, origin: str, solver: str, schedule: str, nfe: int, family: str) -> dict:
    return {"model": subject.name, "origin": origin, "solver": solver, "schedule": schedule, "nfe": nfe,
            "family": family}


def plan(subject: BenchModel, settings: Settings, calibrator: Calibrator, skipped: list[str]) -> list[Planned]:
    """Every configuration of one model: the baseline, ours, then diffusers'. Configurations that
    cannot meet an NFE exactly are added to `skipped`; optimised walks are searched if not saved."""
    return _baselines(subject, settings) + _ours(subject, settings, calibrator, skipped) + \
        _anchors(subject, settings, skipped)


def calibrations_dir(out_dir: Path, name: str) -> Path:
    """Where the run saves a model's new optimised walks (the shipped ones are only read)."""
    return Path(out_dir) / "calibrations" / name / "schedules"


def row(record: dict, planned: Planned) -> dict:
    """A bench row: the lab record (without its provenance payload) with the bench's identity.

    `nfe` is per guidance branch (the bench's axis); `model_calls` counts both branches.
    """
    dropped = ("determined_by", "last_call", "stack", "overrides", "anchor", "has_images", "nfe", "solver",
               "schedule")
    passes = 2 if planned.config.guidance.has_uncond_pass else 1
    return {**{k: v for k, v in record.items() if k not in dropped}, **planned.identity,
            "model_calls": planned.identity["nfe"] * passes}


def measure(job: Job, planned: list[Planned], position: int | None = 0) -> list[dict]:
    """Measures (or reuses) each planned configuration of a job; returns the bench rows."""
    rows = []
    for item in tqdm(planned, desc=f"bench samplers {job.model.name}", unit="config", position=position or 0,
                     disable=position is None):
        record, _ = job.measure(item.config, split=False)
        rows.append(row(record, item))
    return rows


def describe(job: Job, subject: BenchModel) -> dict:
    """The model's entry in the JSON settings."""
    reference, _ = job.reference()
    return {subject.name: {"guidance": subject.guidance, "weights": str(job.model.folder),
                           "weights_hash": job.model.weights_hash, "parameters": subject.fingerprint,
                           "pipeline": type(job.model.pipe).__name__,
                           "scheduler": type(job.model.pipe.scheduler).__name__,
                           "reference": subject.reference.describe(), "reference_flops": reference["flops"]}}


def prepare(name: str, settings: Settings, out_dir: Path, rank: int = 0, log=tqdm.write):
    """A model's job, its planned configurations (walks searched as needed), its reference and the skips."""
    job, subject = open_job(name, settings, out_dir, rank)
    calibrator = Calibrator(subject, settings.calibration, calibrations_dir(out_dir, name), log=log)
    skipped: list[str] = []
    planned = plan(subject, settings, calibrator, skipped)
    job.check([item.config for item in planned if item.config.stack is not None])
    job.reference()
    return job, subject, planned, skipped


def _bench_one(name: str, settings: Settings, out_dir: Path) -> tuple[list, list, dict]:
    """Benchmarks one model in this process; returns (rows, skipped lines, the model's description)."""
    job, subject, planned, skipped = prepare(name, settings, out_dir)
    job.report_resumption([item.config for item in planned])
    return measure(job, planned), skipped, describe(job, subject)


def _cpu_seconds() -> float:
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def run(quick: bool, json_path: Path | None, out_dir: Path, settings: Settings | None = None) -> list[dict]:
    """Runs the benchmark (see the module docstring); returns the rows.

    Args:
        quick: the shortened sweep (QUICK) instead of the full one (FULL).
        json_path: also write the JSON summary here.
        out_dir: folder for the outputs and the resumable records.
        settings: overrides the preset (tests).
    """
    from accel.bench._samplers_pool import run_pool

    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if settings.workers <= 1:
        results = [_bench_one(name, settings, out_dir) for name in settings.models]
        rows = [r for result in results for r in result[0]]
        skipped = [line for result in results for line in result[1]]
        models = {key: value for result in results for key, value in result[2].items()}
    else:
        rows, skipped, models = run_pool(settings, out_dir)
    timing = {"wall_seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(_cpu_seconds() - cpu_start, 1), "threads": torch.get_num_threads()}
    summary = report.write_outputs(rows, skipped, {**asdict(settings), "models": models}, timing, json_path, out_dir)
    return summary["records"]
