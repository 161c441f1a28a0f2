"""`accel bench caches [--quick] [--json PATH]`: our cache presets against cache-dit and diffusers.

In one run on the embedded FLUX-architecture model (50-step Euler, guidance 4, the same seeds for
every configuration) it sweeps every preset of `caching/` over its main parameter, cache-dit 1.5.3's
DBCache (F1B0 and F8B0 over `residual_diff_threshold`, with and without its TaylorSeer
calibrator) and diffusers' own caches (FirstBlockCache, TaylorSeerCache, MagCache,
PyramidAttentionBroadcast) on the same transformer, plus plain Euler with fewer steps (the
equal-FLOPs baseline). Each configuration gives one record: `method`, `params`, `origin`,
`flops_speedup` (torch-counted FLOPs of the whole generation vs the reference), `wall_speedup`
(median of timed repeats of one fixed batch after a warm-up), `psnr`, `ssim` (vs the reference of
the same seeds), `fd` (to real digits in the judge's features) and `accuracy` (the judge's).

Outputs under `out_dir`: caches.jsonl (finished records; a rerun skips them), caches.json,
caches.md (tables), caches.png (FLOPs speedup vs PSNR with per-origin frontiers). The anchors
need the `bench` extra (`pip install -e .[bench]`); without it they are skipped with a note.
Variants with `steps="calibrated K"` (and `gains="calibrated"`) load their searched placement and
forecast gains when the provenance matches, from `out_dir/calibrations/<model>/cache-schedules/`
first, then from the shipped `<model_dir>/cache-schedules/` (only read); else they search them on
the calibration seeds first and save them under `out_dir` (`_cache_placements.PlacementStore`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from accel import io
from accel.bench import _cache_report as report
from accel.bench._cache_harness import Bench, Journal, Settings
from accel.bench._cache_origins import Variant, cache_dit_available
from accel.embedded import FLUX_DIGITS_DIR

QUICK_SEED, FULL_SEED = 0, 1
NOT_APPLICABLE = {"deepcache": "its deep-branch scope needs a UNet; the embedded model is a FLUX transformer"}
CALIBRATED = {"teacache": "teacache", "magcache": "magcache"}

# (preset, swept parameter, quick values, full values, fixed parameters). The "+ Taylor" rows
# stack a Taylor forecast (order 1) on the adaptive triggers, as cache-dit's sweep adds its
# TaylorSeer calibrator to DBCache.
TAYLOR1 = {"update": "taylor", "order": 1}
OURS = [
    ("fora", "interval", (3,), (2, 3, 4), {}),
    ("deltadit", "interval", (4,), (2, 3, 4), {}),
    ("teacache", "threshold", (0.1, 0.2), (0.03, 0.05, 0.1, 0.15, 0.2, 0.3), {}),
    ("teacache", "threshold", (0.2,), (0.05, 0.1, 0.15, 0.2, 0.3), TAYLOR1),
    ("magcache", "threshold", (0.12,), (0.03, 0.06, 0.12, 0.24), {}),
    ("magcache", "threshold", (), (0.06, 0.12, 0.24), TAYLOR1),
    ("fbcache", "threshold", (0.2,), (0.08, 0.12, 0.16, 0.2, 0.3), {}),
    ("fbcache", "threshold", (), (0.12, 0.2, 0.3), TAYLOR1),
    ("dbcache", "threshold", (0.2,), (0.08, 0.12, 0.16, 0.2, 0.3), {}),
    ("pab", "interval", (4,), (2, 3, 4), {}),
    ("toca", "interval", (4,), (2, 3, 4, 5), {}),
    ("taylorseer", "interval", (4, 6, 8, 10), (4, 5, 6, 7, 8, 9, 10, 12), {}),
    ("taylorseer", "steps", ("calibrated 7", "calibrated 8", "calibrated 9"),
     tuple(f"calibrated {k}" for k in (5, 6, 7, 8, 9, 10, 12, 14)), {"warmup": 0.0}),
    ("taylorseer", "steps", ("calibrated 8",), ("calibrated 6", "calibrated 8", "calibrated 10"),
     {"warmup": 0.0, "order": 2}),
    ("taylorseer", "steps", ("calibrated 6", "calibrated 8"),
     tuple(f"calibrated {k}" for k in (5, 6, 7, 8, 9, 10)), {"warmup": 0.0, "order": 2, "gains": "calibrated"}),
    ("foca", "interval", (3, 4), (2, 3, 4, 5), {}),
    ("budget", "threshold", (0.3,), (0.1, 0.15, 0.2, 0.3, 0.4), {}),
]
EULER_STEPS = ((8, 12, 16), (6, 8, 10, 12, 14, 16, 20, 25, 32))
# cache-dit DBCache: (Fn, quick thresholds, full thresholds); each with and without TaylorSeer.
# F8B0 on this 8-block model computes every block (its Fn covers the whole stack).
CACHE_DIT = [(1, (0.2, 0.4), (0.1, 0.2, 0.3, 0.4, 0.6)), (8, (), (0.1, 0.2, 0.4))]
# (method, swept parameter, quick values, full values, fixed parameters)
DIFFUSERS = [
    ("FirstBlockCache", "threshold", (0.2, 0.4), (0.05, 0.1, 0.2, 0.3, 0.4, 0.6), {}),
    ("TaylorSeerCache", "cache_interval", (4,), (3, 5, 8), {}),
    ("TaylorSeerCache", "cache_interval", (6, 8), (4, 5, 6, 7, 8, 9, 10, 12), {"use_lite_mode": True}),
    ("MagCache", "threshold", (0.12,), (0.03, 0.06, 0.12, 0.24, 0.4), {}),
    ("PyramidAttentionBroadcast", "spatial_attention_block_skip_range", (2,), (2, 3, 4), {}),
]


def default_settings(quick: bool) -> Settings:
    """Quick: 10 classes x 4 samples (seed 0), the first 20 timed twice; full: 10 x 10 (seed 1),
    100 timed three times. The presets' defaults were tuned on other seeds (777)."""
    if quick:
        return Settings(model_dir=str(FLUX_DIGITS_DIR), samples_per_class=4, seed=QUICK_SEED, timing_batch=20,
                        timing_repeats=2)
    return Settings(model_dir=str(FLUX_DIGITS_DIR), samples_per_class=10, seed=FULL_SEED, timing_batch=100,
                    timing_repeats=3)


def variants(quick: bool) -> list[Variant]:
    """Every configuration of a run, the fewer-steps baselines first, then ours, then the anchors."""
    pick = 0 if quick else 1
    out = [Variant("accel", "euler-steps", {"steps": n}, steps=n) for n in EULER_STEPS[pick]]
    for method, name, *values, fixed in OURS:
        out += [Variant("accel", method, {name: v, **fixed}, calibrate=_calibration_of(method, name))
                for v in values[pick]]
    for fn_blocks, *thresholds in CACHE_DIT:
        for taylorseer in (False, True):
            out += [Variant("cache-dit", f"DBCache F{fn_blocks}B0",
                            {"Fn": fn_blocks, "Bn": 0, "threshold": t, "taylorseer": taylorseer})
                    for t in thresholds[pick]]
    for method, name, *values, fixed in DIFFUSERS:
        out += [Variant("diffusers", method, {name: v, **fixed},
                        calibrate="diffusers-magcache" if method == "MagCache" else None)
                for v in values[pick]]
    return out


def _calibration_of(method: str, name: str) -> str | None:
    """What a variant needs calibrated: TeaCache / MagCache fits, or for `steps="calibrated K"` a
    placement of K computed steps (caching.search_compute_steps) on the calibration seeds."""
    return "steps" if name == "steps" else CALIBRATED.get(method)


def _runnable(variant: Variant) -> bool:
    return variant.origin != "cache-dit" or cache_dit_available()


def _reference(bench: Bench, journal: Journal, out_dir: Path) -> dict:
    """The full-step reference record (reused with its saved images when resuming)."""
    variant = Variant("accel", "reference", {})
    images_path = out_dir / f"reference-{bench.fingerprint}.safetensors"
    if variant.key in journal.done and images_path.is_file():
        bench.reference_images = load_file(images_path)["images"]
        return journal.done[variant.key]
    record = bench.measure(variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.save_safetensors(images_path, {"images": bench.reference_images})
    journal.add(record)
    return record


def measure_all(bench: Bench, variant_list: list[Variant], out_dir: Path, mode: str) -> list[dict]:
    """The reference and every runnable variant, resuming finished ones from the journal."""
    journal = Journal(out_dir / f"caches-{mode}.jsonl", bench.fingerprint)
    bench.reference = _reference(bench, journal, out_dir)
    records = [bench.reference]
    skipped = [v for v in variant_list if not _runnable(v)]
    if skipped:
        print(f"skipping {len(skipped)} cache-dit configurations: cache-dit is not installed "
              "(pip install -e .[bench])")
    todo = [v for v in variant_list if _runnable(v)]
    bar = tqdm(todo, desc="caches", unit="config")
    for variant in bar:
        bar.set_postfix_str(variant.key[:60])
        record = journal.done.get(variant.key)
        if record is None:
            record = bench.measure(variant)
            journal.add(record)
        records.append(record)
    return records


def placements_dir(out_dir: Path, settings: Settings) -> Path:
    """Where the run saves new placement and gains searches: the shipped layout under the output folder."""
    return Path(out_dir) / "calibrations" / Path(settings.model_dir).name / "cache-schedules"


def _quiet_anchor_logs() -> None:
    logging.getLogger("CACHE_DIT").setLevel(logging.ERROR)
    logging.getLogger("caching").setLevel(logging.ERROR)


def run(quick: bool, json_path: Path | None, out_dir: Path, *, settings: Settings | None = None,
        variant_list: list[Variant] | None = None, evaluator=None) -> list[dict]:
    """Runs the benchmark; returns the records (the reference first).

    Args:
        quick: the shortened sweep (under 20 minutes on 2 CPU cores).
        json_path: where to write the records as JSON (besides out_dir/caches.json).
        out_dir: folder for the journal, JSON, tables and plot.
        settings: override the quick / full settings (tests use a tiny model).
        variant_list: override the configurations.
        evaluator: override the quality evaluator (tests).
    """
    started = time.perf_counter()
    _quiet_anchor_logs()
    out_dir = Path(out_dir)
    settings = settings or default_settings(quick)
    variant_list = variants(quick) if variant_list is None else variant_list
    mode = "quick" if quick else "full"
    bench = Bench(settings, evaluator, placements_dir=placements_dir(out_dir, settings))
    print(f"accel bench caches ({mode}): {len(bench.labels)} samples (seed {settings.seed}), "
          f"{settings.reference_steps}-step Euler "
          f"reference, guidance {settings.guidance}, {torch.get_num_threads()} threads, model {bench.hash}")
    for name, why in NOT_APPLICABLE.items():
        print(f"not run: {name} ({why})")
    records = measure_all(bench, variant_list, out_dir, mode)
    elapsed = time.perf_counter() - started
    _write_outputs(records, json_path, out_dir, settings, mode, elapsed)
    return records


def _write_outputs(records: list[dict], json_path: Path | None, out_dir: Path, settings: Settings,
                   mode: str, elapsed: float) -> None:
    """Prints the Pareto table, the per-level comparison and the targets; writes JSON, markdown, plot."""
    print()
    print(report.format_table(report.table_rows(records)))
    print()
    print(report.format_levels(records))
    targets = report.check_targets(records)
    print("\ntargets:")
    for target in targets:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['detail']}")
    report.write_json(records, [out_dir / "caches.json"] + ([Path(json_path)] if json_path else []))
    title = f"accel bench caches ({mode}, {len(settings.classes) * settings.samples_per_class} samples)"
    report.plot(records, out_dir / "caches.png", title)
    io.write_text(
        out_dir / "caches.md",
        f"# {title}\n\n## Pareto frontiers\n\n{report.markdown(report.table_rows(records, True))}\n\n"
        f"## All configurations\n\n{report.markdown(report.table_rows(records))}\n\n## Targets\n\n"
        + "\n".join(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['detail']}" for t in targets)
        + f"\n\n```\n{report.format_levels(records)}\n```\n")
    print(f"\nwrote {out_dir}/caches.json, caches.md, caches.png"
          + (f" and {json_path}" if json_path else ""))
    print(f"time taken: {elapsed / 60:.1f} min")
