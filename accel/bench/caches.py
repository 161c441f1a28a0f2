"""`accel bench caches [--quick] [--json PATH] [--out DIR]`: our caches against cache-dit's and diffusers'.

One lab `Job` on the embedded pipeline (FluxDigitsPipeline: 50-step Euler, guidance 4, the same seeds
for every configuration, the 50-step Euler reference of those seeds) and a list of `Configuration`s:

* the fewer-steps baselines of three solvers (Euler, DPM-Solver++ 2M, UniPC): the best solver's
  equal-FLOPs line, not only Euler's;
* every preset of `caching/` over its main parameter, through `accel.apply`. What a preset marks
  `calibrated` (TaylorSeer's computed steps and forecast gains, TeaCache's coefficients, MagCache's
  ratios) comes from a calibration file of the calibrate machinery (`accel.lab.calibrate`, on
  calibration seeds, never the evaluated ones): the bench's own under `<out>/calibrations/`, else a
  shipped one whose provenance matches (`embedded:calibrations/`), else it is searched now and
  written under `<out>/calibrations/` (never into the package);
* the anchors, installed as their documentation shows (`_cache_anchors`): cache-dit's DBCache with
  its step masks (static and dynamic `steps_mask` policies) and its TaylorSeer (orders 1 and 2) and
  FoCa calibrators, DBCache thresholds with `max_continuous_cached_steps`; diffusers' TaylorSeerCache
  (lite at intervals 4 to 12), FirstBlockCache, MagCache and PyramidAttentionBroadcast.

Every configuration is a record of the job's RecordStore (a rerun reuses each one whose fingerprint
matches). Outputs under out_dir: caches.json (records), caches.md (table and the best FLOPs speedup
reaching each PSNR level per family), caches.png (FLOPs speedup vs PSNR and FD, the baselines'
frontier). cache-dit needs the `bench` extra; without it its configurations are skipped with a note.
What the project aims for (and whether a run meets it) is stated in docs/caching.md, not here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from accel.bench._cache_anchors import (Anchor, cache_dit_anchor, cache_dit_available, diffusers_anchor,
                                        diffusers_mag_ratios)
from accel.calibration import Calibration, CalibrationError, check_provenance, find_markers, replace_markers
from accel.data_files import EMBEDDED_WEIGHTS_DIR
from accel.io import write_json, write_text
from accel.lab.fingerprint import model_identity
from accel.lab.job import Configuration, Job
from accel.lab.report import format_table, markdown_table, plot_pareto
from accel.recipe import load_recipe
from accel.stack import SamplerPlan, Stack

SHIPPED_CALIBRATIONS = EMBEDDED_WEIGHTS_DIR / "calibrations"
JOURNAL = "bench-caches.trials.jsonl"  # one trials journal: variants that share trials share them
# Quick: 10 classes x 4 samples (seed 0), the first 20 timed twice; full: 10 x 10 (seed 1), 100 timed 3 times.
SETTINGS = {True: dict(samples_per_class=4, seed=0, timing_batch=20, timing_repeats=2),
            False: dict(samples_per_class=10, seed=1, timing_batch=100, timing_repeats=3)}
BASELINES = {True: {"euler": (6, 8, 12, 16), "dpmpp_2m": (5, 6, 8, 12), "unipc_bh2": (4, 5, 6, 8, 12)},
             False: {"euler": (6, 8, 10, 12, 14, 16, 20, 25, 32), "dpmpp_2m": (4, 5, 6, 8, 10, 12, 16, 20),
                     "unipc_bh2": (4, 5, 6, 8, 10, 12, 16, 20)}}
TAYLOR1 = {"update": "taylor", "order": 1}
CAL = {"coefficients": "calibrated"}
# (preset, swept parameter, quick values, full values, fixed parameters)
OURS = [
    ("fora", "interval", (3,), (2, 3, 4), {}),
    ("deltadit", "interval", (4,), (2, 3, 4), {}),
    ("teacache", "threshold", (0.1, 0.2), (0.03, 0.05, 0.1, 0.15, 0.2, 0.3), CAL),
    ("teacache", "threshold", (0.2,), (0.05, 0.1, 0.15, 0.2, 0.3), {**CAL, **TAYLOR1}),
    ("magcache", "threshold", (0.12,), (0.03, 0.06, 0.12, 0.24), {"ratios": "calibrated"}),
    ("magcache", "threshold", (), (0.06, 0.12, 0.24), {"ratios": "calibrated", **TAYLOR1}),
    ("fbcache", "threshold", (0.2,), (0.08, 0.12, 0.16, 0.2, 0.3), {}),
    ("fbcache", "threshold", (), (0.12, 0.2, 0.3), TAYLOR1),
    ("dbcache", "threshold", (0.2,), (0.08, 0.12, 0.16, 0.2, 0.3), {}),
    ("pab", "interval", (4,), (2, 3, 4), {}),
    ("toca", "interval", (4,), (2, 3, 4, 5), {}),
    ("taylorseer", "interval", (4, 6, 8, 10), (4, 5, 6, 7, 8, 9, 10, 12), {}),
    ("taylorseer", "steps", ("calibrated 8",), tuple(f"calibrated {k}" for k in (5, 6, 7, 8, 9, 10, 12, 14)),
     {"warmup": 0.0}),
    ("taylorseer", "steps", ("calibrated 6", "calibrated 8"), ("calibrated 6", "calibrated 8", "calibrated 10"),
     {"warmup": 0.0, "order": 2}),
    ("taylorseer", "steps", ("calibrated 6", "calibrated 8"), tuple(f"calibrated {k}" for k in (5, 6, 7, 8, 9, 10)),
     {"warmup": 0.0, "order": 2, "gains": "calibrated"}),
    ("foca", "interval", (3, 4), (2, 3, 4, 5), {}),
    ("budget", "threshold", (0.3,), (0.1, 0.15, 0.2, 0.3, 0.4), {}),
]
NOT_APPLICABLE = {"deepcache": "its deep-branch scope needs a UNet; the embedded model is a FLUX transformer"}


@dataclass(frozen=True)
class Sweep:
    """What a run measures besides the reference.

    Attributes:
        baselines: solver -> step counts of the fewer-steps line.
        ours: (preset, parameters) of our caches.
        anchors: `anchors(job)` -> the other projects' configurations.
    """

    baselines: dict
    ours: list
    anchors: Callable[[Job], list[Anchor]]


def default_sweep(quick: bool) -> Sweep:
    return Sweep(BASELINES[quick], our_variants(quick), lambda job: anchors(job, quick))


def bench_recipe(quick: bool, out_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The job's recipe: the embedded model, Euler at the reference's 50 steps (uniform flow times),
    guidance 4, no cache; `overrides` (key=value) last (tests: a tiny model, fewer steps)."""
    s = SETTINGS[quick]
    recipe = load_recipe("embedded-demo", [
        "name=bench-caches", f"inputs.samples_per_class={s['samples_per_class']}", f"inputs.seed={s['seed']}",
        f"eval.timing_batch={s['timing_batch']}", f"eval.timing_repeats={s['timing_repeats']}",
        f"output.dir={out_dir}", "calibrate.samples=10", "calibrate.seed=0", *overrides])
    recipe.sampler.solver, recipe.sampler.steps = "euler", int(recipe.eval.reference.steps)
    recipe.sampler.schedule = "flow"
    for key in ("sampler.schedule_params", "sampler.solver_params"):
        OmegaConf.update(recipe, key, {}, merge=False)
    return recipe


def baselines(recipe: DictConfig, counts: dict) -> list[Configuration]:
    """Plain solvers with fewer steps (no cache): every solver's equal-FLOPs line."""
    guidance = Stack.from_recipe(recipe).guidance
    return [Configuration(f"{solver} {steps} steps", "equal-flops-baseline",
                          Stack(SamplerPlan(solver, steps, "flow"), guidance=guidance), steps, guidance)
            for solver, steps_list in counts.items() for steps in steps_list]


def our_variants(quick: bool) -> list[tuple[str, dict]]:
    """(preset, parameters) of every configuration of ours."""
    return [(preset, {name: value, **fixed}) for preset, name, *values, fixed in OURS
            for value in values[0 if quick else 1]]


def variant_name(preset: str, params: dict) -> str:
    """A file-safe name of a variant, e.g. `bench-caches-taylorseer-order=2,steps=calibrated_6,warmup=0.0`."""
    items = ",".join(f"{key}={params[key]}" for key in sorted(params))
    return f"bench-caches-{preset}-" + re.sub(r"[^A-Za-z0-9.,=_-]+", "_", items)


def _variant_recipe(base: DictConfig, preset: str, params: dict) -> DictConfig:
    recipe = copy.deepcopy(base)
    recipe.cache.preset = preset
    OmegaConf.update(recipe, "cache.params", dict(params), merge=False)
    recipe.name = variant_name(preset, params)
    return recipe


def _matching(recipe: DictConfig, identity: str, files: list[Path]) -> Calibration | None:
    """The first calibration file made for exactly this recipe's markers, settings and weights."""
    markers = find_markers(recipe)
    for path in files:
        try:
            calibration = Calibration.read(str(path))
            check_provenance(calibration, recipe, identity)
        except CalibrationError:
            continue
        if all(key in calibration.values for key in markers):
            return calibration
    return None


def calibrated_variant(job: Job, recipe: DictConfig, out_dir: Path) -> tuple[DictConfig, dict]:
    """The variant's recipe with its calibrated values in place, and {"calibration": the file they came
    from, "calibrated": the values} ({} when nothing is marked): the bench's own file, a shipped one
    with the same provenance, or a search now (written under `out_dir/calibrations/`)."""
    from accel.lab.calibrate import calibrate_recipe

    markers = find_markers(recipe)
    if not markers:
        return recipe, {}
    own = out_dir / "calibrations" / f"{recipe.name}.json"
    shipped = sorted(SHIPPED_CALIBRATIONS.glob("*.json")) if SHIPPED_CALIBRATIONS.is_dir() else []
    calibration = _matching(recipe, model_identity(job.model.pipe), [own, *shipped])
    if calibration is None:
        calibrate_recipe(recipe, out_dir, model=job.model, journal=out_dir / "calibrations" / JOURNAL)
        calibration = Calibration.read(str(own))
    values = {key: calibration.values[key] for key in markers}
    return replace_markers(recipe, values), {"calibration": calibration.path, "calibrated": values}


def our_configs(job: Job, variants: list, out_dir: Path) -> list[tuple[Configuration, dict]]:
    """Our presets as configurations (calibrated where marked), each with its record's extra fields."""
    out = []
    for preset, params in tqdm(variants, desc="calibrations", leave=False, disable=None):
        recipe, calibrated = calibrated_variant(job, _variant_recipe(job.recipe, preset, params), out_dir)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        config = Configuration.from_recipe(recipe, label=f"{preset} ({shown})", kind="stack")
        out.append((config, {"origin": "accel", "family": "cache", "method": preset, "params": params,
                             **calibrated}))
    return out


def anchors(job: Job, quick: bool) -> list[Anchor]:
    """cache-dit's (when installed) and diffusers' configurations, swept as densely as ours."""
    out: list[Anchor] = []
    steps = int(job.recipe.sampler.steps)
    if cache_dit_available():
        thresholds, masks = ((0.2, 0.3, 0.4), ("medium", "fast", "ultra")) if quick else \
            ((0.08, 0.12, 0.2, 0.3, 0.4, 0.6), ("slow", "medium", "fast", "ultra"))
        calibrators = [("taylorseer", 1), ("taylorseer", 2), ("foca", 1)]
        for threshold in thresholds:
            for calibrator in [None, "taylorseer"] if quick else [None, "taylorseer", "foca"]:
                out.append(cache_dit_anchor("DBCache F1B0", steps, threshold=threshold, calibrator=calibrator))
        for mask in masks:
            for calibrator, order in calibrators:
                out.append(cache_dit_anchor(f"SCM {mask}", steps, mask_policy=mask, static=True,
                                            calibrator=calibrator, order=order))
        for mask in (("fast", "ultra") if quick else masks):
            for threshold in ((0.3,) if quick else (0.12, 0.3)):
                out.append(cache_dit_anchor(f"SCM {mask}", steps, mask_policy=mask, threshold=threshold,
                                            calibrator="taylorseer"))
    intervals = (4, 6, 8, 10, 12) if quick else tuple(range(4, 13))
    out += [diffusers_anchor("TaylorSeerCache", steps, {"cache_interval": i, "use_lite_mode": True})
            for i in intervals]
    out += [diffusers_anchor("TaylorSeerCache", steps, {"cache_interval": i}) for i in ((4,) if quick else (3, 5, 8))]
    out += [diffusers_anchor("FirstBlockCache", steps, {"threshold": t})
            for t in ((0.2, 0.4) if quick else (0.05, 0.1, 0.2, 0.3, 0.4, 0.6))]
    out += [diffusers_anchor("PyramidAttentionBroadcast", steps, {"spatial_attention_block_skip_range": r})
            for r in ((2,) if quick else (2, 3, 4))]
    ratios = _diffusers_mag_ratios(job)
    out += [diffusers_anchor("MagCache", steps, {"threshold": t, "mag_ratios": ratios}, {"threshold": t})
            for t in ((0.12,) if quick else (0.03, 0.06, 0.12, 0.24, 0.4))]
    return out


def _diffusers_mag_ratios(job: Job) -> list[float]:
    """diffusers' own MagCache calibration, on the calibration samples (never the evaluated ones)."""
    from accel.distributed import batch_slices
    from accel.lab.calibrate import calibration_inputs
    from accel.lab.generate import _call as call_pipeline

    inputs = calibration_inputs(job.recipe, job.model.is_embedded)
    guidance, steps = Stack.from_recipe(job.recipe).guidance, int(job.recipe.sampler.steps)
    run = lambda: [call_pipeline(job.model, inputs, piece, steps, guidance)  # noqa: E731
                   for piece in batch_slices(len(inputs), int(job.recipe.inputs.batch_size))]
    return diffusers_mag_ratios(job.model.pipe, run, steps)


def anchor_config(anchor: Anchor, steps: int, guidance) -> Configuration:
    """An anchor on the pipeline as loaded (its own scheduler walks the reference's steps)."""
    return Configuration(anchor.label, "anchor", None, steps, guidance, install=anchor.install,
                         identity=anchor.identity())


def best_at(records: list[dict], level: float) -> dict | None:
    """The record with the largest FLOPs speedup among those reaching `level` dB (None: none does)."""
    reaching = [r for r in records if r.get("psnr", 0.0) >= level]
    return max(reaching, key=lambda r: r["flops_speedup"], default=None)


def level_rows(records: list[dict], levels=range(25, 41)) -> list[dict]:
    """Per PSNR level, the best FLOPs speedup of ours, of the best anchor and of the fewer-steps line."""
    groups = {"ours": [r for r in records if r.get("origin") == "accel"],
              "anchor": [r for r in records if r.get("kind") == "anchor"],
              "baseline": [r for r in records if r.get("kind") == "equal-flops-baseline"]}
    rows = []
    for level in levels:
        row: dict = {"psnr": level}
        for name, members in groups.items():
            best = best_at(members, level)
            row[name] = best["flops_speedup"] if best else 1.0
            row[f"{name}_label"] = best["label"] if best else "reference"
        row["flops_ratio"] = row["anchor"] / row["ours"]
        rows.append(row)
    return rows


def levels_markdown(rows: list[dict]) -> str:
    lines = ["| PSNR >= | ours | best anchor | best fewer-steps solver | FLOPs ours / anchor |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['psnr']} dB | {row['ours']:.2f}x ({row['ours_label']}) | {row['anchor']:.2f}x "
                     f"({row['anchor_label']}) | {row['baseline']:.2f}x ({row['baseline_label']}) | "
                     f"{row['flops_ratio']:.2f} |")
    return "\n".join(lines)


def run(quick: bool, json_path: Path | None, out_dir: Path, *, overrides: Sequence[str] = (),
        sweep: Sweep | None = None) -> list[dict]:
    """Runs (or resumes) the benchmark; returns the records, the reference first.

    Args:
        quick: the shortened sweep.
        json_path: also write the records there.
        out_dir: the job's folder (records, images, calibrations, outputs).
        overrides: recipe overrides of the job (tests: a tiny model).
        sweep: what to measure (default: the quick or full sweep).
    """
    out_dir, mode = Path(out_dir), "quick" if quick else "full"
    sweep = sweep or default_sweep(quick)
    job = Job.open(bench_recipe(quick, out_dir, overrides), "accel bench caches", folder=out_dir)
    guidance, steps = Stack.from_recipe(job.recipe).guidance, int(job.recipe.sampler.steps)
    print(f"accel bench caches ({mode}): {len(job.inputs)} samples (seed {job.recipe.inputs.seed}), {steps}-step "
          f"Euler reference, guidance {guidance.scale}, model {job.model.weights_hash}", flush=True)
    for name, why in NOT_APPLICABLE.items():
        print(f"not run: {name} ({why})")
    if not cache_dit_available():
        print("skipping cache-dit's configurations: cache-dit is not installed (pip install 'accel-stack[bench]')")
    entries = [(config, {"origin": "baseline", "family": "sampler", "method": config.stack.sampler.solver,
                         "params": {"steps": config.steps}}) for config in baselines(job.recipe, sweep.baselines)]
    entries += our_configs(job, sweep.ours, out_dir)
    entries += [(anchor_config(a, steps, guidance), {"origin": a.origin, "family": "anchor", "method": a.method,
                                                     "params": a.params}) for a in sweep.anchors(job)]
    job.check([config for config, _ in entries])
    reference, ref_images = job.reference()
    job.report_resumption([config for config, _ in entries])
    records = [{**reference, "flops_speedup": 1.0, "wall_speedup": 1.0, **job.evaluator(ref_images, ref_images),
                "origin": "reference", "family": "reference", "method": "reference", "params": {}}]
    for config, extra in tqdm(entries, desc="caches", unit="config", disable=None):
        record, _ = job.measure(config)
        records.append({**record, **extra})
    write_outputs(records, out_dir, f"{mode}, {len(job.inputs)} samples", json_path)
    return records


def write_outputs(records: list[dict], out_dir: Path, what: str, json_path: Path | None) -> None:
    """caches.json, caches.md (table and levels), caches.png; prints the table and the levels."""
    slim = [{k: v for k, v in r.items() if k not in ("determined_by", "stack", "last_call")} for r in records]
    for path in [out_dir / "caches.json"] + ([Path(json_path)] if json_path else []):
        write_json(path, slim, indent=1, default=str)
    ordered = sorted(records, key=lambda r: (["reference", "sampler", "cache", "anchor"].index(r["family"]),
                                             r["flops_speedup"]))
    rows = level_rows(records)
    title = f"accel bench caches ({what})"
    plot_pareto(out_dir / "caches.png", records, title)
    write_text(out_dir / "caches.md", f"# {title}\n\n{markdown_table(ordered)}\n\n## Best FLOPs speedup reaching "
                                      f"each PSNR level\n\n{levels_markdown(rows)}\n")
    print(format_table(ordered))
    print("\n" + levels_markdown(rows))
    print(f"\nwrote {out_dir}/caches.json, caches.md, caches.png" + (f" and {json_path}" if json_path else ""))
