"""The samplers benchmark on a pool of single-thread worker processes, balanced across the models.

One process per model left the UNet's process idle for the second half of a run while the flow
model (about 2.4x the cost per evaluation) finished alone. Here each model is first *prepared* in
one task (its optimised walks and its reference, both saved on disk), then its configurations run
as small tasks (one origin/solver/schedule across the NFEs, costliest first) that either worker
takes. Every task runs one thread; a worker keeps its model's job (pipeline, evaluator) between
tasks and appends its records to its own journal of the job's record store (rank 1, 2, ...).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

_CONTEXTS: dict[tuple[str, str], Any] = {}
_RANK = 0


def _start_worker(counter: Any) -> None:
    """Pool initializer: one thread, and a rank of its own (the records journal it appends to)."""
    global _RANK
    torch.set_num_threads(1)
    with counter.get_lock():
        counter.value += 1
        _RANK = counter.value


def _context(name: str, settings, out_dir: Path):
    from accel.bench import samplers as bench  # the benchmark module imports this one

    key = (name, str(out_dir))
    if key not in _CONTEXTS:
        _CONTEXTS[key] = bench.prepare(name, settings, out_dir, rank=_RANK)
    return _CONTEXTS[key]


def _shards(planned: list) -> list[list[str]]:
    """Configuration labels grouped by (origin, solver, schedule), the groups with the most evaluations first."""
    groups: dict[tuple, list] = {}
    for item in planned:
        identity = item.identity
        groups.setdefault((identity["origin"], identity["solver"], identity["schedule"]), []).append(item)
    ordered = sorted(groups.values(), key=lambda group: -sum(item.identity["nfe"] for item in group))
    return [[item.config.label for item in group] for group in ordered]


def _prepare(name: str, settings, out_dir: Path) -> tuple[list[list[str]], list[str], dict]:
    """Task: a model's walks and reference; returns (its shards, skipped lines, description)."""
    from accel.bench import samplers as bench

    job, subject, planned, skipped = _context(name, settings, out_dir)
    job.report_resumption([item.config for item in planned])
    return _shards(planned), skipped, bench.describe(job, subject)


def _run_shard(name: str, settings, out_dir: Path, labels: list[str]) -> list[dict]:
    """Task: measures the configurations named by `labels` of one model; returns their rows."""
    from accel.bench import samplers as bench

    job, _, planned, _ = _context(name, settings, out_dir)
    wanted = set(labels)
    return bench.measure(job, [item for item in planned if item.config.label in wanted], position=None)


def run_pool(settings, out_dir: Path) -> tuple[list[dict], list[str], dict]:
    """Benchmarks `settings.models` on `settings.workers` processes; returns (rows, skipped lines, descriptions)."""
    rows: list[dict] = []
    skipped: list[str] = []
    described: dict = {}
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    with ProcessPoolExecutor(max_workers=settings.workers, mp_context=context, initializer=_start_worker,
                             initargs=(counter,)) as pool:
        prepared = {pool.submit(_prepare, name, settings, out_dir): name for name in settings.models}
        shards = []
        for future in as_completed(prepared):
            name = prepared[future]
            plan, lines, info = future.result()
            skipped += lines
            described.update(info)
            shards += [pool.submit(_run_shard, name, settings, out_dir, labels) for labels in plan]
            tqdm.write(f"{name}: prepared; {len(plan)} configuration groups queued")
        for future in tqdm(as_completed(shards), total=len(shards), desc="bench samplers", unit="group"):
            rows += future.result()
    return rows, skipped, described
