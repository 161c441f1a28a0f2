"""`accel bench overhead [--quick] [--json PATH] [--out DIR]`: what accel adds on the user's path.

One FluxPipeline per variant (the same random weights, `_overhead_pipelines`), timed eagerly in
interleaved rounds so that load drift hits every variant alike, then compiled
(`pipe.transformer.compile()` after `accel.apply`, the user's order):

* `bare`: the pipeline as diffusers ships it (FlowMatchEulerDiscreteScheduler);
* `none`: `accel.apply` with Euler on the pipeline's own walk and no cache (scheduler + branch hook);
* `fora-1`, `fbcache-0`: caches that compute every step (FORA's attention scope at interval 1:
  a hook on every attention and MLP layer; FBCache at threshold 0: a feature-watching trigger with
  its one host sync per step);
* `reuse-3`: the whole transformer residual computed every 3rd step and reused in between;
* `taylor-3` (full run): the same with TaylorSeer's order-1 forecast;
* with `--cache-dit` (GPU command): `fbcache-0.08` and cache-dit's DBCache F1B0 at the same threshold.

Each record: seconds per generation and per step, the per-step overhead over `bare` in ms and %
(none for variants that skip work), FLOPs of one generation (torch-counted, eager), `flop_ratio` = bare FLOPs / FLOPs
and `wall_ratio` = bare seconds / seconds (same mode), `efficiency` = wall_ratio / flop_ratio, and
for compiled runs the graphs dynamo compiled during warm-up and afterwards (`steady_graphs`, 0 when
compiled code is reused). Times are lower quartiles (`QUANTILE`), per step over every denoising
step of every timed generation (callback to callback: transformer, hooks, scheduler, loop) and per
generation: a shared VM's CPU runs in slow bursts of a few hundred ms (steps 50% slower), which
move medians by more than the hooks cost, and the lower quartile is the undisturbed cost (two
copies of the bare pipeline agree to 1%). Compiled variants are interleaved alike (see
`_compiled_times`). Outputs under `out_dir`: overhead.json, overhead.md.

GPU (FLUX width, bf16): `python -m accel.bench.overhead --device cuda --model flux-width
--dtype bfloat16 --height 1024 --width 1024 --steps 28 --cache-dit --out runs/bench-overhead-gpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from accel import io
from accel.lab.report import format_table, markdown_table
from accel.bench._overhead_pipelines import MODELS, PipelineSpec, build_pipeline, copy_pipeline

QUICK_VARIANTS = ("bare", "none", "fora-1", "fbcache-0", "reuse-3")
FULL_VARIANTS = QUICK_VARIANTS + ("taylor-3",)
CACHE_DIT_VARIANTS = ("fbcache-0.08", "cache-dit-F1B0-0.08")
# variant -> (cache preset, parameters); "bare" and "cache-dit-*" are not accel stacks.
CACHES: dict[str, tuple[str, dict] | None] = {
    "none": None,
    "fora-1": ("fora", {"interval": 1}),
    "fbcache-0": ("fbcache", {"threshold": 0.0}),
    "reuse-3": ("taylorseer", {"interval": 3, "update": "reuse", "warmup": 0.0}),
    "taylor-3": ("taylorseer", {"interval": 3, "order": 1, "warmup": 0.0}),
    "fbcache-0.08": ("fbcache", {"threshold": 0.08, "warmup": 0.1}),
}
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class Settings:
    """One benchmark run.

    Attributes:
        spec: the pipeline to build.
        steps: solver steps per generation.
        repeats: timed generations per variant and mode (lower quartiles are reported).
        variants: the variants to time (names above).
        modes: "eager" and/or "compiled".
        threads: torch CPU threads (None leaves torch's setting).
        backend: the torch.compile backend of compiled runs ("inductor"; "eager" traces only).
    """

    spec: PipelineSpec = PipelineSpec()
    steps: int = 20
    repeats: int = 3
    variants: tuple[str, ...] = QUICK_VARIANTS
    modes: tuple[str, ...] = MODES
    threads: int | None = 1
    backend: str = "inductor"

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v != "bare" and v not in CACHES and not v.startswith("cache-dit")]
        if unknown or "bare" not in self.variants:
            raise ValueError(f"overhead bench: variants {unknown or self.variants} invalid; include 'bare' and "
                             f"choose from {', '.join(('bare', *CACHES, *CACHE_DIT_VARIANTS))}")
        problems = ([f"modes {','.join(self.modes)} (use eager, compiled or eager,compiled)"]
                    if not self.modes or any(mode not in MODES for mode in self.modes) else [])
        problems += [f"steps {self.steps} (use >= 4)"] if self.steps < 4 else []
        problems += [f"repeats {self.repeats} (use >= 1)"] if self.repeats < 1 else []
        if problems:
            raise ValueError(f"overhead bench: invalid {'; '.join(problems)}")


def stack_of(variant: str, steps: int):
    """The accel Stack of a variant (Euler on the pipeline's own walk, no CFG)."""
    from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

    cache = CACHES[variant]
    plan = None if cache is None else CachePlan(cache[0], dict(cache[1]))
    return Stack(SamplerPlan("euler", steps, "auto"), plan, (), GuidancePlan(1.0))


def _prepare(variant: str, pipe: Any, steps: int) -> None:
    if variant == "bare":
        return
    if variant.startswith("cache-dit"):
        import cache_dit
        from cache_dit import DBCacheConfig

        threshold = float(variant.rsplit("-", 1)[1])
        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                                residual_diff_threshold=threshold,
                                                                max_warmup_steps=max(1, steps // 10)))
        return
    import accel

    accel.apply(pipe, stack_of(variant, steps))


QUANTILE = 0.25  # the lower quartile: see the module docstring


@dataclass
class Timing:
    """What the timed generations of one variant took.

    Attributes:
        generations: seconds of each whole generation (synchronised on CUDA).
        steps: seconds of each denoising step after the first of each generation (the loop from
            one step-end callback to the next); on the CPU only (on a GPU a sync per step would stop
            the host's work from overlapping the kernels, which is what is measured there).
    """

    generations: list[float] = dataclasses.field(default_factory=list)
    steps: list[float] = dataclasses.field(default_factory=list)


def lower_quantile(values: list[float]) -> float:
    """The `QUANTILE` quantile of `values` (inclusive method; the value itself for one sample)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(100 * QUANTILE) - 1]


def _generate(pipe: Any, kwargs: dict, steps: int, device: str, timing: Timing | None = None) -> None:
    """One generation, its wall-clock and step times added to `timing` (synchronised on CUDA)."""
    stamps: list[float] = []
    on_cuda = device.startswith("cuda")

    def step_end(_pipe: Any, _index: int, _timestep: Any, callback_kwargs: dict) -> dict:
        if timing is not None and not on_cuda:
            stamps.append(time.perf_counter())
        return callback_kwargs

    generator = torch.Generator(device).manual_seed(0)
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(**kwargs, num_inference_steps=steps, generator=generator, callback_on_step_end=step_end)
    if on_cuda:
        torch.cuda.synchronize()
    if timing is not None:
        timing.generations.append(time.perf_counter() - start)
        timing.steps += [end - begin for begin, end in zip(stamps, stamps[1:])]


def _flops(pipe: Any, kwargs: dict, steps: int, device: str) -> float:
    with FlopCounterMode(display=False) as counter:
        _generate(pipe, kwargs, steps, device)
    return float(counter.get_total_flops())


def _timed_rounds(pipes: dict[str, Any], kwargs: dict, settings: Settings,
                  graphs: dict[str, list[int]] | None = None) -> dict[str, Timing]:
    """`repeats` rounds over every variant; each round starts one variant later and every other round
    runs backwards, so no variant keeps a position (on a 2-core CPU the first run of a round is
    measurably slower or faster than the rest, by more than the hooks cost). With `graphs`, the
    graphs dynamo compiles during each variant's generations are added to its second entry."""
    from torch._dynamo.utils import counters

    names = list(pipes)
    times = {name: Timing() for name in names}
    for round_index in range(settings.repeats):
        order = [names[(round_index + offset) % len(names)] for offset in range(len(names))]
        for name in (reversed(order) if round_index % 2 else order):
            before = counters["stats"]["unique_graphs"]
            _generate(pipes[name], kwargs, settings.steps, settings.spec.device, times[name])
            if graphs is not None:
                graphs[name][1] += counters["stats"]["unique_graphs"] - before
    return times


def _compiled_times(pipes: dict[str, Any], kwargs: dict, settings: Settings) -> tuple[dict, dict]:
    """Every variant compiled with the same backend (`pipe.transformer.compile()` after apply) and
    warmed up in turn, counting the graphs dynamo compiled for it, then timed in interleaved rounds
    as the eager variants are. Their compiled code coexists (one cache entry per variant and path
    of each shared function, so dynamo's recompile limit is raised here: a user's process holds one).

    Returns:
        (Timing per variant, (graphs compiled during warm-up, graphs compiled while timed) per
        variant).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs: dict[str, list[int]] = {}
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        for name, pipe in pipes.items():
            before = counters["stats"]["unique_graphs"]
            pipe.transformer.compile(backend=settings.backend)
            for _ in range(2):
                _generate(pipe, kwargs, settings.steps, settings.spec.device)
            graphs[name] = [counters["stats"]["unique_graphs"] - before, 0]
        times = _timed_rounds(pipes, kwargs, settings, graphs)
    torch._dynamo.reset()
    return times, {name: (warm, steady) for name, (warm, steady) in graphs.items()}


def _records(mode: str, times: dict[str, Timing], flops: dict[str, float], graphs: dict[str, tuple[int, int]],
             settings: Settings) -> list[dict]:
    def step_seconds(timing: Timing) -> float:
        return lower_quantile(timing.steps) if timing.steps else lower_quantile(timing.generations) / settings.steps

    bare, bare_step = lower_quantile(times["bare"].generations), step_seconds(times["bare"])
    records = []
    for name, timing in times.items():
        seconds, step = lower_quantile(timing.generations), step_seconds(timing)
        flop_ratio = flops["bare"] / flops[name] if flops.get(name) else None
        wall_ratio = bare / seconds
        skips_work = flop_ratio is not None and flop_ratio > 1.001  # its steps differ: no per-step overhead
        record = dict(variant=name, mode=mode, model=settings.spec.model, device=settings.spec.device,
                      dtype=settings.spec.dtype, height=settings.spec.height, width=settings.spec.width,
                      steps=settings.steps, repeats=len(timing.generations), quantile=QUANTILE, seconds=seconds,
                      seconds_median=statistics.median(timing.generations), step_ms=1000 * step,
                      overhead_ms_per_step=None if skips_work else 1000 * (step - bare_step),
                      overhead_pct=None if skips_work else 100 * (step / bare_step - 1),
                      flops=flops.get(name), flop_ratio=flop_ratio, wall_ratio=wall_ratio,
                      efficiency=wall_ratio / flop_ratio if flop_ratio else None,
                      graphs=graphs[name][0] if name in graphs else None,
                      steady_graphs=graphs[name][1] if name in graphs else None)
        records.append(record)
    return records


def measure(settings: Settings, log: Callable[[str], None] = print) -> list[dict]:
    """Times every variant, eager then compiled; returns one record per (mode, variant)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    base, kwargs = build_pipeline(settings.spec)
    pipes = {}
    for name in settings.variants:
        pipes[name] = copy_pipeline(base)
        _prepare(name, pipes[name], settings.steps)
    timed = []
    if "eager" in settings.modes:
        for pipe in pipes.values():  # warm-up: calibrations, allocator
            _generate(pipe, kwargs, settings.steps, settings.spec.device)
        log(f"timing {len(pipes)} variants, eager, {settings.repeats} interleaved rounds")
        timed.append(("eager", _timed_rounds(pipes, kwargs, settings), {}))
    if "compiled" in settings.modes:
        log(f"timing {len(pipes)} variants, compiled ({settings.backend}), {settings.repeats} interleaved rounds")
        times, graphs = _compiled_times(pipes, kwargs, settings)
        timed.append(("compiled", times, graphs))
    # FLOPs last, on fresh eager copies: once FlopCounterMode has run, every module call of the
    # process is slower (measured: bare 7.3 -> 10.4 ms/step on the tiny pipeline), which would
    # distort every timing after it.
    flops = {}
    for name in settings.variants:
        fresh = copy_pipeline(base)
        _prepare(name, fresh, settings.steps)
        _generate(fresh, kwargs, settings.steps, settings.spec.device)  # calibrating triggers calibrate first
        flops[name] = _flops(fresh, kwargs, settings.steps, settings.spec.device)
    return [record for mode, times, graphs in timed for record in _records(mode, times, flops, graphs, settings)]


COLUMNS = (("mode", "mode", "{}"), ("variant", "variant", "{}"), ("step_ms", "ms/step", "{:.2f}"),
           ("overhead_ms_per_step", "overhead ms/step", "{:+.3f}"), ("overhead_pct", "overhead", "{:+.1f}%"),
           ("flop_ratio", "FLOP ratio", "{:.2f}x"), ("wall_ratio", "wall ratio", "{:.2f}x"),
           ("efficiency", "wall/FLOP", "{:.2f}"), ("graphs", "graphs", "{}"), ("steady_graphs", "steady", "{}"))


def _cache_dit_note(settings: Settings) -> tuple[Settings, str | None]:
    import importlib.util

    wanted = [v for v in settings.variants if v.startswith("cache-dit")]
    if not wanted or importlib.util.find_spec("cache_dit") is not None:
        return settings, None
    kept = tuple(v for v in settings.variants if v not in wanted)
    return dataclasses.replace(settings, variants=kept), "cache-dit is not installed (pip install cache-dit); skipped"


LEGEND = ("overhead: time per step over bare (lower is better; none for variants that skip work); wall ratio: "
          "bare's time per generation / the variant's (above 1 is a speedup); wall/FLOP (`efficiency` in the "
          "JSON): wall ratio / FLOP ratio (1 means wall-clock follows the FLOPs saved); graphs: graphs dynamo "
          "compiled for the variant while warming up; steady: graphs it compiled while timed (0: compiled "
          "code reused).")
FEW_SAMPLES = 200  # per-step samples per variant below which the bench says its overheads are noise


def _sample_note(settings: Settings) -> str | None:
    samples = settings.repeats * (settings.steps - 1)
    if settings.spec.device != "cpu" or samples >= FEW_SAMPLES:
        return None
    return (f"{samples} step times per variant (repeats x (steps - 1)): on a shared CPU, overheads of a few "
            f"percent either way are noise at this size; use --repeats {-(-FEW_SAMPLES // (settings.steps - 1))} "
            "or more")


def _title(settings: Settings) -> str:
    spec = settings.spec
    return (f"{spec.model} FluxPipeline, {spec.height}x{spec.width}, {settings.steps} Euler steps, {spec.device} "
            f"{spec.dtype}, lower quartiles of {settings.repeats} rounds (per step: overhead; per generation: wall "
            f"ratio)")


def write(runs: list[tuple[Settings, list[dict]]], out_dir: Path, json_path: Path | None, notes: list[str]) -> None:
    """overhead.json and overhead.md under `out_dir` (and `json_path` if given): one section per model."""
    payload = {"settings": [dataclasses.asdict(settings) for settings, _ in runs], "notes": notes,
               "records": [record for _, records in runs for record in records]}
    io.write_json(out_dir / "overhead.json", payload, indent=2)
    if json_path is not None:
        io.write_json(json_path, payload, indent=2)
    sections = [f"## {_title(settings)}\n\n{markdown_table(records, COLUMNS)}\n\n{LEGEND}\n"
                for settings, records in runs]
    io.write_text(out_dir / "overhead.md", "# accel bench overhead\n\n" + "\n".join(sections)
                  + "".join(f"\n{note}\n" for note in notes))


def run_settings(suites: "Settings | list[Settings]", json_path: Path | None, out_dir: Path) -> list[dict]:
    """Measures each settings (one per model), prints the tables and writes the files."""
    runs, notes = [], []
    for settings in ([suites] if isinstance(suites, Settings) else suites):
        settings, note = _cache_dit_note(settings)
        for line in (note, _sample_note(settings)):
            notes += [line] if line and line not in notes else []
        records = measure(settings)
        print(f"{_title(settings)}\n{format_table(records, COLUMNS)}\n")
        runs.append((settings, records))
    for line in notes:
        print(line)
    write(runs, out_dir, json_path, notes)
    return [record for _, records in runs for record in records]


def run(quick: bool, json_path: Path | None, out_dir: Path) -> list[dict]:
    """`accel bench overhead`: on the CPU at 256x256, one thread, the tiny pipeline (Python's share of a
    step is largest there: the strictest test of what the hooks cost) and the small one (its blocks
    take most of a step, as at FLUX width on a GPU: does wall-clock follow FLOPs)."""
    small = dict(spec=PipelineSpec("small"), variants=("bare", "none", "fbcache-0", "reuse-3"))
    if quick:
        return run_settings([Settings(steps=20, repeats=20), Settings(steps=20, repeats=5, **small)], json_path,
                            out_dir)
    full = [Settings(steps=50, repeats=32, variants=FULL_VARIANTS), Settings(steps=50, repeats=10, **small)]
    return run_settings(full, json_path, out_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m accel.bench.overhead`: the same bench with the model, device and size as flags."""
    parser = argparse.ArgumentParser(prog="python -m accel.bench.overhead", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=MODELS, help="the FluxPipeline to build")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--height", type=int, default=256, help="pixels, a multiple of 16")
    parser.add_argument("--width", type=int, default=256, help="pixels, a multiple of 16")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps per generation (>= 4)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds over the variants (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: 1 on the CPU)")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join((*CACHES, *CACHE_DIT_VARIANTS))} (None: all but "
                             "the cache-dit ones; bare is always run)")
    parser.add_argument("--cache-dit", action="store_true", help="add fbcache-0.08 and cache-dit's DBCache F1B0")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--out", default="runs/bench-overhead", help="folder for overhead.json and overhead.md")
    args = parser.parse_args(argv)
    variants = FULL_VARIANTS + (CACHE_DIT_VARIANTS if args.cache_dit else ())
    if args.variants:
        variants = ("bare", *(v for v in args.variants.split(",") if v != "bare"))
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    try:
        settings = Settings(PipelineSpec(args.model, args.height, args.width, args.device, args.dtype),
                            steps=args.steps, repeats=args.repeats, variants=variants,
                            modes=tuple(args.modes.split(",")), threads=threads)
        out_dir = io.claim_folder(Path(args.out), "accel bench overhead")
        run_settings(settings, Path(args.json) if args.json else None, out_dir)
    except ValueError as error:
        print(f"accel: error: {io.first_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
