"""`accel bench samplers`: our solvers and schedules against diffusers' own schedulers, on both
embedded models, at NFE 4, 6, 8, 10, 15 and 20.

For each model (the flow model `flux-digits`, the epsilon UNet `unet-digits`) every configuration
samples the same seeded noise and labels with classifier-free guidance. Quality is PSNR and SSIM
against a 200-step Heun reference of the same seeds (our Heun on uniform t for the flow model, on
Karras sigmas for the UNet), FD to real data in the judge's feature space and the judge's class
accuracy. Our optimised schedules are calibrated on other seeds; the shipped walks
(`<weights>/schedules/`) are reused when their provenance matches, new searches are saved under
`<out_dir>/calibrations/<model>/schedules/` and reused from there.

    accel bench samplers --quick --json runs/samplers.json

Outputs under out_dir: samplers.json (records, skipped configurations, target checks, settings),
samplers.md (the tables), samplers.png (quality vs NFE) and samplers-records-<model>.jsonl, the finished
records that a rerun skips. ACCEL_BENCH_FLUX_DIR / ACCEL_BENCH_UNET_DIR point at other weights.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import samplers
from accel import io, measure
from accel.bench import _samplers_report as report
from accel.bench._samplers_diffusers import (DiffusersConfig, epsilon_configs, flow_configs, sample_diffusers,
                                             steps_for_nfe)
from accel.bench._samplers_models import BenchModel, epsilon_subject, flow_subject, sample_ours, sample_reference
from accel.bench._samplers_optimized import Calibration, Calibrator
from accel.bench._samplers_pool import run_pool
from accel.embedded import FLUX_DIGITS_DIR, JudgeFeatures, load_flux_digits, load_judge
from accel.embedded.data import real_reference_set
from accel.embedded.unet import UNET_DIGITS_DIR, load_unet_digits
from accel.generate import sample_noise

NFES = (4, 6, 8, 10, 15, 20)


@dataclass(frozen=True)
class Settings:
    """What one run sweeps and how many samples it measures.

    Attributes:
        samples: evaluation samples per configuration (labels cycle through the 10 classes).
        seed: noise seed of the evaluation samples.
        batch_size: samples per model call.
        nfes: NFE budgets (model evaluations per guidance branch).
        real_samples: real images for the FD statistics.
        ours: per model name, our configurations as "solver/schedule" (schedule "optimized" included);
            None, or a model missing from it: every solver on every schedule of its family and an
            optimised schedule for each solver.
        optimize_nfes: NFE budgets that get an optimised schedule (None: all of `nfes`).
        diffusers: diffusers settings as "Solver/schedule" (None: all).
        calibration: the calibration set of the optimised schedules.
        workers: single-thread processes sharing the models' work (1: everything in this process).
        model_dirs: per model name, the folder of its weights (default: ACCEL_BENCH_FLUX_DIR /
            ACCEL_BENCH_UNET_DIR, else the trained weights).
    """

    samples: int = 200
    seed: int = 0
    batch_size: int = 50
    nfes: tuple[int, ...] = NFES
    real_samples: int = 2000
    ours: dict[str, tuple[str, ...]] | None = None
    optimize_nfes: tuple[int, ...] | None = None
    diffusers: tuple[str, ...] | None = None
    calibration: Calibration = field(default_factory=Calibration)
    workers: int = 2
    model_dirs: dict[str, str] | None = None


FULL = Settings()
# The quick sweep keeps every NFE and every diffusers setting; of ours it keeps each solver family's
# best schedules on the calibration seeds, and optimises one solver per model at the target NFEs 6
# and 8 (calibrating both from scratch costs about 2.5 CPU minutes for the flow model, 1.2 for the UNet).
QUICK = Settings(
    samples=30, batch_size=30, real_samples=1000, optimize_nfes=(6, 8),
    ours={"flux-digits": ("euler/flux", "heun/flux", "dpmpp_2m/flux", "dpmpp_3m/flux", "unipc_bh2/flow",
                          "unipc_bh2/flux", "ipndm/flux", "unipc_bh2/optimized"),
          "unet-digits": ("euler/karras", "heun/karras", "dpmpp_2m/logsnr", "dpmpp_3m/logsnr", "unipc_bh2/karras",
                          "unipc_bh2/logsnr", "unipc_bh2/timestep", "ipndm/logsnr", "unipc_bh2/optimized")})


@dataclass
class Job:
    """One configuration to measure: a record's identity, how to make its images (noise, labels) and
    what to prepare untimed before (an optimised schedule's calibration)."""

    record: dict
    make: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prepare: Callable[[], object] | None = None
    variant: Callable[[], str | None] | None = None  # what else a stored record must match (schedule file)


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


def _our_jobs(subject: BenchModel, settings: Settings, calibrator: Calibrator,
              skipped: list[str]) -> list[Job]:
    jobs = []
    optimize_nfes = settings.optimize_nfes or settings.nfes
    for solver, schedule in _our_pairs(subject, settings):
        spec = samplers.get_solver(solver)
        for nfe in settings.nfes:
            try:
                spec.steps_for_nfe(nfe)
            except ValueError as error:
                skipped.append(f"{subject.name} accel {solver}/{schedule} NFE {nfe}: {error}")
                continue
            if schedule == "optimized" and nfe not in optimize_nfes:
                continue
            prepare = variant = None
            if schedule == "optimized":
                prepare, variant = (lambda s=solver, n=nfe: calibrator.get(s, n)), (
                    lambda s=solver, n=nfe: calibrator.digest(s, n))

            def make(noise, labels, solver=solver, nfe=nfe, schedule=schedule):
                if schedule == "optimized":
                    options = {"path": str(calibrator.get(solver, nfe)), "solver": solver}
                else:
                    options = subject.schedules[schedule]
                return sample_ours(subject, solver, nfe, schedule, options, noise, labels, settings.batch_size)
            jobs.append(Job(_identity(subject, "accel", solver, schedule, nfe), make, prepare, variant))
    return jobs


def _diffusers_jobs(subject: BenchModel, configs: list[DiffusersConfig], betas: dict | None,
                    settings: Settings, skipped: list[str]) -> list[Job]:
    jobs = []
    for config in configs:
        if settings.diffusers is not None and f"{config.solver}/{config.schedule}" not in settings.diffusers:
            continue
        for nfe in settings.nfes:
            try:
                steps_for_nfe(config, nfe, betas)
            except ValueError as error:
                skipped.append(f"{subject.name} diffusers {config.solver}/{config.schedule} NFE {nfe}: {error}")
                continue

            def make(noise, labels, config=config, nfe=nfe):
                return sample_diffusers(config, subject, betas, nfe, noise, labels, settings.batch_size)
            jobs.append(Job(_identity(subject, "diffusers", config.solver, config.schedule, nfe), make))
    return jobs


def _identity(subject: BenchModel, origin: str, solver: str, schedule: str, nfe: int) -> dict:
    return {"model": subject.name, "solver": solver, "schedule": schedule, "nfe": nfe, "origin": origin}


class Evaluator:
    """PSNR / SSIM against the reference, FD to real data and the judge's accuracy."""

    def __init__(self, real_samples: int, resolution: int = 16):
        self.judge = load_judge()
        real, _ = real_reference_set(real_samples, resolution)
        self.fd = measure.FrechetDistance(JudgeFeatures(self.judge), measure.to_unit_range(real))

    def __call__(self, images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
        unit, unit_ref = measure.to_unit_range(images), measure.to_unit_range(reference)
        return {"psnr": measure.psnr(unit, unit_ref), "ssim": measure.ssim(unit, unit_ref),
                "fd": self.fd(unit), "accuracy": measure.class_accuracy(self.judge, unit, labels)}


def _signature(subject: BenchModel, settings: Settings) -> str:
    return (f"{subject.fingerprint}:g{subject.guidance}:n{settings.samples}:s{settings.seed}:"
            f"{subject.reference.describe()}")


def _variant(signature: str, variant: str | None) -> str:
    return f"{signature}:{variant}" if variant else signature


def _read_reference(path: Path) -> torch.Tensor | None:
    """Cached reference images (safetensors only); None when absent or unreadable (said on stderr)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(path)["images"]
    except (SafetensorError, OSError, KeyError) as error:
        print(f"accel: {path} is unreadable ({io.first_line(error)}); generating the reference again", file=sys.stderr)
        return None


def _reference(subject: BenchModel, settings: Settings, noise: torch.Tensor, labels: torch.Tensor,
               out_dir: Path) -> torch.Tensor:
    """The reference images, cached in out_dir under the run's signature."""
    name = _signature(subject, settings).split(":")[0]
    path = out_dir / f"reference-{subject.name}-{name}-n{settings.samples}-s{settings.seed}.safetensors"
    cached = _read_reference(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    images = sample_reference(subject, noise, labels, settings.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.save_safetensors(path, {"images": images})
    print(f"{subject.name}: reference {subject.reference.describe()} in {time.perf_counter() - start:.0f} s")
    return images


def plan_jobs(subject: BenchModel, configs: list[DiffusersConfig], betas: dict | None, settings: Settings,
              calibrator: Calibrator, skipped: list[str]) -> list[Job]:
    """Every configuration of one model, ours then diffusers'; configurations that cannot meet an
    NFE exactly are added to `skipped`."""
    return _our_jobs(subject, settings, calibrator, skipped) + _diffusers_jobs(subject, configs, betas,
                                                                               settings, skipped)


def _stored(job: Job, store: report.RecordStore, signature: str) -> dict | None:
    variant = job.variant() if job.variant is not None else ""
    return None if variant is None else store.get(_variant(signature, variant), report.record_key(job.record))


def _inputs(subject: BenchModel, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(settings.samples) % 10
    return sample_noise(settings.seed, range(settings.samples), subject.shape), labels


def prepare_model(subject: BenchModel, jobs: list[Job], settings: Settings, store: report.RecordStore,
                  out_dir: Path) -> None:
    """The untimed work of the jobs still to run: their optimised schedules and the reference."""
    signature = _signature(subject, settings)
    pending = [job for job in jobs if _stored(job, store, signature) is None]
    for job in pending:
        if job.prepare is not None:
            job.prepare()
    if pending:
        _reference(subject, settings, *_inputs(subject, settings), out_dir)


def bench_model(subject: BenchModel, jobs: list[Job], settings: Settings, evaluate: Evaluator,
                store: report.RecordStore, out_dir: Path, position: int | None = 0) -> list[dict]:
    """Measures the jobs of one model (reusing finished records); returns the records.

    `position` places the progress bar (None: no bar, for worker processes).
    """
    noise, labels = _inputs(subject, settings)
    signature = _signature(subject, settings)
    reference = None
    records = []
    for job in tqdm(jobs, desc=f"bench samplers {subject.name}", unit="config", position=position or 0,
                    disable=position is None):
        done = _stored(job, store, signature)
        if done is not None:
            records.append(done)
            continue
        if reference is None:
            reference = _reference(subject, settings, noise, labels, out_dir)
        if job.prepare is not None:
            job.prepare()
        start = time.perf_counter()
        images = job.make(noise, labels)
        seconds = time.perf_counter() - start
        variant = job.variant() if job.variant is not None else ""
        record = {**job.record, **evaluate(images, reference, labels), "seconds": round(seconds, 2),
                  "samples": settings.samples, "guidance": subject.guidance,
                  "signature": _variant(signature, variant)}
        store.add(record)
        records.append(record)
    return records


MODELS = ("flux-digits", "unet-digits")


def load_subject(name: str, settings: Settings | None = None) -> tuple[BenchModel, list[DiffusersConfig], dict | None]:
    """An embedded model by name (settings.model_dirs, the folder named by the environment, or the
    trained weights) with its diffusers settings and betas."""
    given = (settings.model_dirs or {}) if settings is not None else {}
    if name == "flux-digits":
        flux_dir = Path(given.get(name) or os.environ.get("ACCEL_BENCH_FLUX_DIR", FLUX_DIGITS_DIR))
        return flow_subject(load_flux_digits(flux_dir), flux_dir), flow_configs(), None
    unet_dir = Path(given.get(name) or os.environ.get("ACCEL_BENCH_UNET_DIR", UNET_DIGITS_DIR))
    unet = load_unet_digits(unet_dir)
    return epsilon_subject(unet, unet_dir), epsilon_configs(), dict(unet.betas)


def describe(subject: BenchModel) -> dict:
    """The model's entry in the JSON settings."""
    return {subject.name: {"guidance": subject.guidance, "weights": str(subject.weights_dir),
                           "reference": subject.reference.describe(), "fingerprint": subject.fingerprint}}


def calibrations_dir(out_dir: Path, subject: BenchModel) -> Path:
    """Where the run saves the model's new optimised walks (the shipped ones are only read)."""
    return Path(out_dir) / "calibrations" / subject.name / "schedules"


def records_path(out_dir: Path, subject: BenchModel) -> Path:
    return out_dir / f"samplers-records-{subject.name}.jsonl"


def _bench_one(triple: tuple, settings: Settings, out_dir: Path) -> tuple[list, list, dict]:
    """Benchmarks one model in this process; returns (records, skipped lines, the model's description)."""
    subject, configs, betas = triple
    skipped: list[str] = []
    calibrator = Calibrator(subject, settings.calibration, calibrations_dir(out_dir, subject), log=tqdm.write)
    jobs = plan_jobs(subject, configs, betas, settings, calibrator, skipped)
    records = bench_model(subject, jobs, settings, Evaluator(settings.real_samples),
                          report.RecordStore(records_path(out_dir, subject)), out_dir)
    return records, skipped, describe(subject)


def _cpu_seconds() -> float:
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def run(quick: bool, json_path: Path | None, out_dir: Path, settings: Settings | None = None,
        subjects: list | None = None) -> list[dict]:
    """Runs the benchmark (see the module docstring); returns the records.

    Args:
        quick: the shortened sweep (QUICK) instead of the full one (FULL).
        json_path: also write the JSON summary here.
        out_dir: folder for the outputs and the resumable records.
        settings: overrides the preset (tests).
        subjects: overrides the models, as (BenchModel, diffusers configs, betas) triples (tests).
    """
    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if subjects is not None or settings.workers <= 1:
        triples = subjects if subjects is not None else [load_subject(name, settings) for name in MODELS]
        results = [_bench_one(triple, settings, out_dir) for triple in triples]
    else:
        results = [run_pool(MODELS, settings, out_dir)]
    records = [record for result in results for record in result[0]]
    skipped = [line for result in results for line in result[1]]
    models = {name: info for result in results for name, info in result[2].items()}
    timing = {"wall_seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(_cpu_seconds() - cpu_start, 1)}
    report.write_outputs(records, skipped, {**asdict(settings), "models": models}, timing, json_path, out_dir)
    return [{k: v for k, v in r.items() if k != "signature"} for r in records]


