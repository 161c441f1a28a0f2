"""The samplers benchmark on a pool of single-thread worker processes, balanced across the models.

One process per model left the UNet's process idle for the second half of a run while the flow
model (about 2.4x the cost per evaluation) finished alone. Here each model is first *prepared* in
one task (its optimised schedules and its 200-step reference, cached on disk), then its
configurations run as small tasks (one solver/schedule across the NFEs, costliest first) that
either worker takes. Every task runs one thread; a worker keeps its loaded models and evaluator.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from accel.bench import _samplers_report as report
from accel.bench._samplers_optimized import Calibrator


@dataclass
class _Context:
    """One model as a worker holds it: its jobs, record store and (once needed) evaluator."""

    subject: object
    jobs: list
    skipped: list[str]
    store: report.RecordStore
    evaluator: object = None


_CONTEXTS: dict[tuple[str, str], _Context] = {}


def _single_thread() -> None:
    torch.set_num_threads(1)


def _context(name: str, settings, out_dir: Path) -> _Context:
    from accel.bench import samplers as bench  # the benchmark module imports this one

    key = (name, str(out_dir))
    if key not in _CONTEXTS:
        subject, configs, betas = bench.load_subject(name, settings)
        skipped: list[str] = []
        calibrator = Calibrator(subject, settings.calibration, bench.calibrations_dir(out_dir, subject),
                                log=tqdm.write)
        jobs = bench.plan_jobs(subject, configs, betas, settings, calibrator, skipped)
        _CONTEXTS[key] = _Context(subject, jobs, skipped, report.RecordStore(bench.records_path(out_dir, subject)))
    return _CONTEXTS[key]


def _shards(jobs: list) -> list[list[str]]:
    """Job keys grouped by (origin, solver, schedule), the groups with the most evaluations first."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        record = job.record
        groups.setdefault((record["origin"], record["solver"], record["schedule"]), []).append(job)
    ordered = sorted(groups.values(), key=lambda group: -sum(job.record["nfe"] for job in group))
    return [[report.record_key(job.record) for job in group] for group in ordered]


def _prepare(name: str, settings, out_dir: Path) -> tuple[list[list[str]], list[str], dict]:
    """Task: a model's calibrations and reference; returns (its shards, skipped lines, description)."""
    from accel.bench import samplers as bench

    context = _context(name, settings, out_dir)
    bench.prepare_model(context.subject, context.jobs, settings, context.store, out_dir)
    return _shards(context.jobs), context.skipped, bench.describe(context.subject)


def _run_shard(name: str, settings, out_dir: Path, keys: list[str]) -> list[dict]:
    """Task: measures the jobs named by `keys` of one model; returns their records."""
    from accel.bench import samplers as bench

    context = _context(name, settings, out_dir)
    if context.evaluator is None:
        context.evaluator = bench.Evaluator(settings.real_samples)
    wanted = set(keys)
    jobs = [job for job in context.jobs if report.record_key(job.record) in wanted]
    return bench.bench_model(context.subject, jobs, settings, context.evaluator, context.store, out_dir,
                             position=None)


def run_pool(models: tuple[str, ...], settings, out_dir: Path) -> tuple[list[dict], list[str], dict]:
    """Benchmarks `models` on `settings.workers` processes; returns (records, skipped lines, descriptions)."""
    records: list[dict] = []
    skipped: list[str] = []
    described: dict = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=settings.workers, mp_context=context, initializer=_single_thread) as pool:
        prepared = {pool.submit(_prepare, name, settings, out_dir): name for name in models}
        shards = []
        for future in as_completed(prepared):
            name = prepared[future]
            plan, lines, info = future.result()
            skipped += lines
            described.update(info)
            shards += [pool.submit(_run_shard, name, settings, out_dir, keys) for keys in plan]
            tqdm.write(f"{name}: prepared; {len(plan)} configuration groups queued")
        for future in tqdm(as_completed(shards), total=len(shards), desc="bench samplers", unit="group"):
            records += future.result()
    return records, skipped, described
