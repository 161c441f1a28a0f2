"""Measuring one cache configuration for `accel bench caches`, and resuming finished ones.

All configurations run on one loaded embedded model with the same seeds. A configuration is
applied, its whole generation (every sample) runs under torch's FLOP counter, a batch of fixed
size is then timed (median of repeats after a warm-up: the counted run itself when the timed
batch is every sample, else one untimed run), and the cache is removed; a short bare "pace" run
before and after measures the machine's speed, so the wall-clock speedup is corrected for a load
that changes during the run (the raw ratio is kept as `wall_speedup_raw`); the bare model's
output on a fixed probe input must then be bitwise what it was before anything was applied (else
the model is reloaded and the record says so). Finished records are appended to a JSONL file
with a fingerprint of the settings and weights, so a rerun skips them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from accel import io, measure
from accel.bench._cache_origins import Adapter, Variant, diffusers_mag_ratios, make_adapter
from accel.bench._cache_placements import PlacementStore
from accel.embedded import load_flux_digits
from accel.embedded.model import weights_fingerprint
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise


@dataclass(frozen=True)
class Settings:
    """What one benchmark run generates and how it measures.

    Attributes:
        model_dir: the FluxDigits folder (transformer/ + conditioner/).
        classes: class labels generated.
        samples_per_class: samples per class (all share one batch).
        seed: noise seed of the evaluated samples.
        calibration_seed: noise seed of the calibration runs (never the evaluated samples).
        calibration_samples: samples in a calibration run (one generation).
        guidance: classifier-free guidance scale.
        reference_steps: Euler steps of the full-compute reference (and of every cache).
        timing_batch: samples in the timed batch (the first ones, the same for every config).
        timing_repeats: timed repeats after the warm-up; the median is reported.
        pace_steps: Euler steps of the bare "pace" run timed before and after each configuration
            (0: no load correction of wall-clock speedups).
        real_samples: real images for the Frechet distance.
        metrics: quality metrics to compute.
    """

    model_dir: str
    classes: tuple[int, ...] = tuple(range(10))
    samples_per_class: int = 4
    seed: int = 0
    calibration_seed: int = 90_210
    calibration_samples: int = 10
    guidance: float = 4.0
    reference_steps: int = 50
    timing_batch: int = 20
    timing_repeats: int = 3
    pace_steps: int = 5
    real_samples: int = 2000
    metrics: tuple[str, ...] = ("psnr", "ssim", "fd", "accuracy")

    def fingerprint(self, model_hash: str) -> str:
        """Hash of the settings and the weights: records of another fingerprint are not reused."""
        payload = json.dumps({**asdict(self), "model": model_hash}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def model_hash(model) -> str:
    """Short hash of the transformer's and conditioner's weights."""
    return weights_fingerprint(model, "sha1")


class _Wrapped:
    """The model with each transformer call passed through an adapter (for diffusers' contexts)."""

    def __init__(self, model, adapter: Adapter) -> None:
        self.model, self.adapter = model, adapter

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.adapter.call(self.model.transformer, lambda: self.model.velocity(x, t, labels))


class Bench:
    """The loaded model, inputs, reference and judge of one run.

    Args:
        settings: what to generate and measure.
        evaluator: optional replacement for accel.execute.Evaluator (tests use a cheaper one).
        placements_dir: where searched placements and gains are saved (the ones shipped in
            `<model_dir>/cache-schedules/` are only read).
    """

    def __init__(self, settings: Settings, evaluator=None, *, placements_dir: Path) -> None:
        self.settings = settings
        self.model = load_flux_digits(settings.model_dir)
        self.hash = model_hash(self.model)
        self.fingerprint = settings.fingerprint(self.hash)
        labels = torch.tensor(settings.classes).repeat_interleave(settings.samples_per_class)
        self.labels = labels
        self.noise = sample_noise(settings.seed, range(len(labels)), (1, 16, 16))
        self.evaluate = evaluator or _evaluator(settings, labels)
        self.calibrations: dict[str, dict] = {}
        self._calibration_reference: torch.Tensor | None = None
        self.reference: dict | None = None
        self.reference_images: torch.Tensor | None = None
        self._last_pace: float | None = None
        self._probe = self._probe_inputs()
        self._bare = self._probe_output()
        self._layout = _module_layout(self.model.transformer)
        s = settings
        self.placements = PlacementStore(Path(placements_dir), {
            "weights": self.hash, "guidance": s.guidance, "reference_steps": s.reference_steps,
            "classes": list(s.classes), "calibration_seed": s.calibration_seed,
            "calibration_samples": s.calibration_samples}, shipped=Path(s.model_dir) / "cache-schedules")

    def _probe_inputs(self):
        generator = torch.Generator().manual_seed(12345)
        x = torch.randn(2, 1, 16, 16, generator=generator)
        return x, torch.tensor([0.7, 0.3]), torch.tensor([3, 10])

    def _probe_output(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.velocity(*self._probe)

    def is_bare(self) -> bool:
        """True when the bare model computes bitwise what it computed before any cache and every
        module's attributes are as they were (no patched forward or hook registry left)."""
        return (torch.equal(self._probe_output(), self._bare)
                and _module_layout(self.model.transformer) == self._layout)

    def generate(self, adapter: Adapter, steps: int, count: int | None = None) -> torch.Tensor:
        """Images (N, 1, 16, 16) in [-1, 1] of the first `count` samples (all by default)."""
        count = len(self.labels) if count is None else count
        denoiser = flux_digits_denoiser(_Wrapped(self.model, adapter), self.settings.guidance)
        return generate(denoiser, SamplingPlan("euler", steps), self.noise[:count], self.labels[:count],
                        count, before_generation=lambda: adapter.before_generation(steps))

    def calibration_run(self, adapter: Adapter) -> torch.Tensor:
        """One full-step generation on the calibration seeds (never the evaluated ones); its images."""
        s = self.settings
        labels = torch.tensor(s.classes).repeat(s.calibration_samples // len(s.classes) + 1)
        labels = labels[:s.calibration_samples]
        noise = sample_noise(s.calibration_seed, range(len(labels)), (1, 16, 16))
        denoiser = flux_digits_denoiser(_Wrapped(self.model, adapter), s.guidance)
        return generate(denoiser, SamplingPlan("euler", s.reference_steps), noise, labels, len(labels),
                        before_generation=lambda: adapter.before_generation(s.reference_steps))

    def calibration_reference(self) -> torch.Tensor:
        """The bare model's calibration images (full compute), generated once per run."""
        if self._calibration_reference is None:
            self._calibration_reference = self.calibration_run(Adapter())
        return self._calibration_reference

    def calibration(self, variant: Variant) -> dict:
        """Calibrated parameters for a variant (computed once per run and kind; a compute-step
        placement once per variant)."""
        kind = variant.calibrate
        if kind is None:
            return {}
        key = variant.key if kind == "steps" else kind
        if key not in self.calibrations:
            self.calibrations[key] = self._search_steps(variant) if kind == "steps" else self._calibrate(kind)
        return self.calibrations[key]

    def _calibrate(self, kind: str) -> dict:
        from caching import calibrate_magcache, calibrate_teacache
        bare = Adapter()
        transformer = self.model.transformer
        if kind == "teacache":
            fitted = calibrate_teacache(transformer, lambda: self.calibration_run(bare))
            return {"coefficients": list(fitted.coefficients)}
        if kind == "magcache":
            return {"ratios": list(calibrate_magcache(transformer, lambda: self.calibration_run(bare)).ratios)}
        if kind == "diffusers-magcache":
            return {"mag_ratios": diffusers_mag_ratios(transformer, self.calibration_run,
                                                       self.settings.reference_steps)}
        raise ValueError(f"unknown calibration {kind!r}")

    def _search_steps(self, variant: Variant) -> dict:
        """For `steps="calibrated K"`: K computed steps of the variant's preset (its other
        parameters fixed) placed by `caching.search_compute_steps` on the calibration seeds,
        starting from an even spread; {"steps": fractions}. With `gains="calibrated"` the same
        placement (of the variant without gains) then gets its forecast gains searched
        (`caching.search_forecast_gains`); {"steps": ..., "gains": [...]}. Saved searches whose
        provenance matches are loaded instead (`PlacementStore`)."""
        stored = self.placements.load(variant)
        if stored is not None:
            return stored
        if variant.params.get("gains") == "calibrated":
            calibration, search = self._search_gains(variant)
        else:
            calibration, search = self._search_placement(variant)
        path = self.placements.save(variant, calibration, search)
        print(f"{variant.method}: saved the search to {path}")
        return calibration

    def _search_placement(self, variant: Variant) -> tuple[dict, dict]:
        from caching import get_preset, search_compute_steps
        method, fixed = variant.method, {k: v for k, v in variant.params.items() if k != "steps"}
        budget = int(str(variant.params["steps"]).split()[-1])
        steps = self.settings.reference_steps
        bare = Adapter()
        initial = sorted({round(i * steps / budget) for i in range(budget)})
        found = search_compute_steps(self.model.transformer,
                                     lambda fractions: get_preset(method, **fixed, steps=fractions),
                                     lambda: self.calibration_run(bare), self.calibration_reference(), initial,
                                     steps,
                                     log=lambda line: print(f"{method} ({budget} steps): {line}"))
        print(f"{method}: {budget} computed steps placed at {list(found.steps)} on the calibration seeds "
              f"(log MSE {found.initial_objective:.2f} -> {found.objective:.2f}, {found.trials} runs)")
        search = {"objective": found.objective, "initial_objective": found.initial_objective,
                  "trials": found.trials, "steps": list(found.steps)}
        return {"steps": list(found.fractions())}, search

    def _search_gains(self, variant: Variant) -> tuple[dict, dict]:
        from caching import get_preset, search_forecast_gains
        base = Variant(variant.origin, variant.method,
                       {k: v for k, v in variant.params.items() if k != "gains"}, calibrate="steps")
        fractions = self.calibration(base)["steps"]
        fixed = {k: v for k, v in variant.params.items() if k not in ("steps", "gains")}
        bare = Adapter()
        found = search_forecast_gains(
            self.model.transformer,
            lambda gains: get_preset(variant.method, **fixed, steps=fractions, gains=gains),
            lambda: self.calibration_run(bare), self.calibration_reference(), len(fractions) - 1,
            log=lambda line: print(f"{variant.method} ({len(fractions)} steps): {line}"))
        print(f"{variant.method}: forecast gains {list(found.gains)} on the calibration seeds "
              f"(log MSE {found.initial_objective:.2f} -> {found.objective:.2f}, {found.trials} runs)")
        search = {"objective": found.objective, "initial_objective": found.initial_objective,
                  "trials": found.trials}
        return {"steps": list(fractions), "gains": list(found.gains)}, search

    def pace(self) -> float:
        """Seconds of a short bare generation of the timed batch: the machine's current speed.

        Wall-clock speedups divide each configuration's time by the mean of the paces measured just
        before and just after it (one pace run between consecutive configurations serves both),
        and the reference's by its own, so a load that changes during a long run on a shared machine
        does not bias them; on an idle machine the correction is 1.
        """
        if self.settings.pace_steps <= 0:
            return 1.0
        batch = min(self.settings.timing_batch, len(self.labels))
        bare = Adapter()
        return measure.time_median(lambda: self.generate(bare, self.settings.pace_steps, batch),
                                   repeats=1, warmup=0)

    def _run(self, variant: Variant, steps: int) -> tuple[torch.Tensor, int, float, dict]:
        """Applies the variant, generates under the FLOP counter, times the batch, removes it."""
        calibration = self.calibration(variant)
        adapter = make_adapter(variant, calibration)
        adapter.apply(self.model.transformer, steps)
        try:
            images, flops = measure.count_flops(lambda: self.generate(adapter, steps))
            batch = min(self.settings.timing_batch, len(self.labels))
            # The counted run is the warm-up when it ran the same batch (same shapes, same paths).
            wall = measure.time_median(lambda: self.generate(adapter, steps, batch),
                                       repeats=self.settings.timing_repeats,
                                       warmup=0 if batch == len(self.labels) else 1)
            extra = _accel_stats(adapter)
            if variant.calibrate == "steps":  # the searched placement, as trajectory fractions
                extra["calibrated_steps"] = calibration["steps"]
                if "gains" in calibration:
                    extra["calibrated_gains"] = calibration["gains"]
            return images, flops, wall, extra
        finally:
            adapter.remove(self.model.transformer)

    def measure(self, variant: Variant) -> dict:
        """Runs one configuration: counted generation, timing, removal check, quality."""
        started = time.perf_counter()
        steps = variant.steps or self.settings.reference_steps
        self.calibration(variant)
        before = self._last_pace if self._last_pace is not None else self.pace()
        images, flops, wall, extra = self._run(variant, steps)
        restored = self.is_bare()
        if not restored:  # e.g. cache-dit keeps its patched forward, diffusers its hook registries
            self.model = load_flux_digits(self.settings.model_dir)
            if not self.is_bare():
                raise RuntimeError(f"reloading the model after {variant.key} did not restore it")
        self._last_pace = self.pace()  # also the next configuration's "before"
        timing = {"flops": flops, "wall_seconds": wall, "pace_seconds": (before + self._last_pace) / 2}
        return self._record(variant, steps, images, timing, restored, extra, started)

    def _record(self, variant: Variant, steps: int, images, timing: dict, restored: bool,
                extra: dict, started: float) -> dict:
        if variant.method == "reference":
            self.reference_images = images
        reference = self.reference or timing
        raw = reference["wall_seconds"] / timing["wall_seconds"]
        record = {"method": variant.method, "params": variant.params, "origin": variant.origin,
                  "steps": steps, "flops_speedup": reference["flops"] / timing["flops"],
                  "wall_speedup": raw * timing["pace_seconds"] / reference["pace_seconds"]}
        record.update(self.evaluate(images, self.reference_images))
        record.update({**timing, "wall_speedup_raw": raw, "restored": restored, **extra,
                       "key": variant.key, "fingerprint": self.fingerprint,
                       "seconds": time.perf_counter() - started})
        return record


def _module_layout(module: torch.nn.Module) -> tuple:
    """Every submodule's attribute names (a patched forward or hook registry shows up here)."""
    return tuple((name, tuple(sorted(vars(sub)))) for name, sub in module.named_modules())


def _accel_stats(adapter: Adapter) -> dict:
    handle = getattr(adapter, "handle", None)
    run = handle.stats.last_run() if handle is not None else None
    if run is None:
        return {}
    return {"cache_flops_speedup": run.flops_speedup, "steps_computed": run.steps_computed("cond")}


def _evaluator(settings: Settings, labels: torch.Tensor):
    from accel.execute import Evaluator
    recipe = OmegaConf.create({"eval": {"metrics": list(settings.metrics), "real_samples": settings.real_samples},
                               "inputs": {"resolution": 16}})
    return Evaluator(recipe, labels)


class Journal:
    """Finished records of one run (JSONL, one record a line), keyed by variant and fingerprint.

    Args:
        path: the JSONL file (created on the first record).
        fingerprint: records with another fingerprint are ignored.
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.done: dict[str, dict] = {}
        for record in io.read_jsonl(path):  # a line cut short by an interruption is skipped (and said)
            if record.get("fingerprint") == fingerprint and "key" in record:
                self.done[record["key"]] = record

    def add(self, record: dict) -> None:
        """Appends a finished record."""
        io.append_jsonl(self.path, record)
        self.done[record["key"]] = record
