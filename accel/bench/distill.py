"""`accel bench distill [--quick] [--json PATH] [--out DIR]`: the shipped adapters and router against
plain solvers, caches and the fewer-steps baseline, in one lab job on the embedded flow model.

Every configuration is a lab `Configuration` built from the `embedded-demo` recipe with overrides
(adapters loaded by `accel.apply` with the pipeline's `load_lora_weights`, caches and CFG reuse
installed by the resolver), generated through `FluxDigitsPipeline` on the same seeds, scored by the
lab's `Evaluator` against the 50-step Euler reference with guidance 4 (FLOPs counted by torch,
PSNR, SSIM, FD to real digits in the judge's features, the judge's accuracy) and kept in the job's
`RecordStore` under its fingerprint (the adapter and router files' hashes included), so a rerun
measures only what changed. The fewer-steps baseline (DPM-Solver++(2M) and UniPC on the model's own
walk at 2-25 steps, with CFG) is measured in the same run; every stack is compared with the best
baseline spending no more FLOPs (`beats_equal_flops_baseline`), and the Pareto plot shows the
baseline as the frontier.

Rows carry `nfe` (solver evaluations per guidance branch), `model_calls` (both branches), `cache`
(a preset name, "cfg-reuse" or null) and `adapter` (null, "step", "cache-aware" or "router"). The
shipped adapters (`embedded:adapters/<name>`, trained by `accel train train/...`) are named in the
overrides like any recipe's; a missing one is skipped with a note. Outputs under out_dir:
distill.json, distill.md, distill.png and the job's records and images (reused by a rerun).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from accel.adapter_files import read_adapter_metadata
from accel.bench import _distill_report as report
from accel.data_files import embedded_name, resolve_data_file
from accel.embedded.model import WEIGHTS_DIR
from accel.lab.ablate import mark_equal_flops_baselines
from accel.lab.job import Configuration, Job
from accel.recipe import load_recipe
from accel.stack import Stack

COMMAND = "accel bench distill"
ADAPTERS_DIR = WEIGHTS_DIR / "adapters"
# The uncond branch computed every 2nd step, (uncond - cond) reused in between (FasterCache's CFG
# reuse): a cache over the guidance branch rather than over features.
CFG_REUSE = "cfg-reuse"
# Step-distillation adapters trained with CFG uncond reuse on (objective.params.student_uncond_interval).
REUSE_TRAINED = ("step-4-cfg-reuse",)
BASELINE_SOLVERS = ("dpmpp_2m", "unipc_bh2")
BASELINE_STEPS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 25)


@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        label: row name.
        overrides: recipe overrides on embedded-demo.
        cache: the cache preset, "cfg-reuse" or None.
        adapter: None, "step", "cache-aware" or "router".
        needs: files under ADAPTERS_DIR it needs (skipped when absent).
        kind: "stack", or "equal-flops-baseline" for the fewer-steps family.
    """

    label: str
    overrides: tuple[str, ...]
    cache: str | None = None
    adapter: str | None = None
    needs: tuple[str, ...] = ()
    kind: str = "stack"

    @property
    def family(self) -> str:
        """The Pareto plot's colour: sampler, cache, adapter or cache+adapter (the router is a cache)."""
        learned = self.adapter in ("step", "cache-aware")
        if self.cache and learned:
            return "cache+adapter"
        return "cache" if self.cache else "adapter" if learned else "sampler"


def _shipped(name: str) -> str:
    """The recipe name of a shipped adapter file or folder, e.g. "embedded:adapters/step-4"."""
    return embedded_name(f"adapters/{name}")


def _adapter(name: str) -> str:
    """The adapter override; fused into the weights, as for deployment (no LoRA matmuls counted)."""
    return f'adapters=[{{path: "{_shipped(name)}", fuse: true}}]'


def _metadata(name: str) -> dict[str, str]:
    """The safetensors header of a shipped adapter ({} when absent)."""
    path = ADAPTERS_DIR / name / "pytorch_lora_weights.safetensors"
    return read_adapter_metadata(path) if path.is_file() else {}


def _guidance(meta: dict[str, str]) -> tuple[str, ...]:
    """Overrides for the guidance an adapter was trained with ("distilled": one cond pass a step)."""
    trained = meta.get("accel.guidance", "distilled")
    return ("guidance.scale=1.0",) if trained == "distilled" else (f"guidance.scale={float(trained)}",)


def baselines() -> list[Config]:
    """The fewer-steps family: DPM-Solver++(2M) and UniPC on the model's own walk, no cache, no adapter."""
    return [Config(f"{solver} {steps}", (f"sampler.solver={solver}", f"sampler.steps={steps}",
                                         "sampler.schedule=auto"), kind="equal-flops-baseline")
            for solver in BASELINE_SOLVERS for steps in BASELINE_STEPS]


def configurations(quick: bool) -> list[Config]:
    """The baseline family, Euler at the adapters' steps, the adapters, the cache without and with
    its adapter, and the router."""
    out = baselines()
    for steps in (4, 8):
        out.append(Config(f"euler {steps}", ("sampler.solver=euler", f"sampler.steps={steps}")))
        meta = _metadata(f"step-{steps}")
        step = ("sampler.solver=euler", f"sampler.steps={steps}", *_guidance(meta), _adapter(f"step-{steps}"))
        out.append(Config(f"step LoRA {steps}", step, adapter="step", needs=(f"step-{steps}",)))
        if meta.get("accel.guidance", "distilled") != "distilled":
            out.append(Config(f"step LoRA {steps} + CFG reuse", (*step, "guidance.uncond_interval=2"),
                              cache=CFG_REUSE, adapter="step", needs=(f"step-{steps}",)))
    for name in REUSE_TRAINED:  # students trained with the uncond branch reused, run as trained
        meta = _metadata(name)
        if meta:
            steps, interval = int(meta["accel.steps"]), int(meta.get("accel.uncond_interval", "1"))
            overrides = (f"sampler.solver={meta['accel.solver']}", f"sampler.steps={steps}", *_guidance(meta),
                         f"guidance.uncond_interval={interval}", _adapter(name))
            out.append(Config(f"reuse-trained step LoRA {steps} + CFG reuse", overrides, cache=CFG_REUSE,
                              adapter="step", needs=(name,)))
    aware = _metadata("cache-aware")
    if aware:
        steps, preset = int(aware["accel.steps"]), aware["accel.cache"]
        params = json.loads(aware.get("accel.cache_params", "{}"))
        cache = (f"sampler.steps={steps}", "sampler.solver=euler", f"cache.preset={preset}",
                 "cache.params={" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
        out.append(Config(f"euler {steps} + {preset}", cache, cache=preset))
        out.append(Config(f"cache-aware LoRA {steps} + {preset}", (*cache, *_guidance(aware),
                                                                   _adapter("cache-aware")),
                          cache=preset, adapter="cache-aware", needs=("cache-aware",)))
    router = _shipped("router/router.safetensors")
    for threshold in (0.3, 0.5, 0.7):
        out.append(Config(f"euler 50 + router@{threshold:g}", (
            "sampler.steps=50", "cache.preset=router", f'cache.params={{path: "{router}", threshold: {threshold}}}'),
            cache="router", adapter="router", needs=("router",)))
    return out


def base_recipe(quick: bool, out_dir: Path, overrides: tuple[str, ...] = ()):
    """embedded-demo with the bench's inputs: quick 10 x 4 samples (seed 0), full 10 x 10 (seed 1)."""
    inputs = ["inputs.samples_per_class=4", "inputs.seed=0", "eval.timing_batch=10", "eval.timing_repeats=1"] \
        if quick else ["inputs.samples_per_class=10", "inputs.seed=1", "eval.timing_batch=20", "eval.timing_repeats=3"]
    base = ["name=bench-distill", "sampler.solver=euler", "sampler.schedule=flow", "cache.preset=null",
            f"output.dir={out_dir}"]
    return load_recipe("embedded-demo", [*inputs, *base, *overrides])


def file_digests(stack: Stack) -> dict[str, str]:
    """sha256 (16 hex) of every adapter and router file the stack reads: a retrained file is measured anew."""
    names = [adapter.path for adapter in stack.adapters]
    if stack.cache is not None and stack.cache.params.get("path"):
        names.append(stack.cache.params["path"])
    digests = {}
    for name in names:
        found = resolve_data_file(name)
        files = sorted(found.glob("*.safetensors")) if found.is_dir() else [found]
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.read_bytes())
        digests[str(name)] = digest.hexdigest()[:16]
    return digests


def configuration(config: Config, quick: bool, out_dir: Path) -> Configuration:
    """The lab configuration of one bench configuration (its recipe validated)."""
    cell = base_recipe(quick, out_dir, config.overrides)
    made = Configuration.from_recipe(cell, label=config.label, kind=config.kind,
                                     overrides={"overrides": list(config.overrides)})
    digests = file_digests(made.stack)
    return dataclasses.replace(made, identity={"files": digests}) if digests else made


def row(record: dict, config: Config, lab: Configuration) -> dict:
    """A bench row: the lab record (without its provenance payload) with the bench's identity.

    `nfe` counts solver evaluations per guidance branch, `model_calls` both branches.
    """
    dropped = ("determined_by", "last_call", "anchor", "has_images", "nfe", "stack")
    passes = 2 if lab.guidance.has_uncond_pass else 1
    return {**{k: v for k, v in record.items() if k not in dropped}, "method": config.label,
            "cache": config.cache, "adapter": config.adapter, "family": config.family,
            "nfe": record["nfe"] // passes, "model_calls": record["nfe"],
            "resolved": list((record.get("stack") or {}).get("decisions") or [])}


def run(quick: bool, json_path: Path | None, out_dir: Path) -> list[dict]:
    """Measures every configuration (reusing stored records); returns the rows, reference first."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    mode = "quick" if quick else "full"
    recipe = base_recipe(quick, out_dir)
    job = Job.open(recipe, COMMAND, folder=out_dir)
    todo = []
    for config in configurations(quick):
        missing = [n for n in config.needs if not (ADAPTERS_DIR / n).exists()]
        if missing:
            print(f"skipped {config.label}: no {', '.join(missing)} under {ADAPTERS_DIR} (train it first)")
            continue
        todo.append((config, configuration(config, quick, out_dir)))
    job.check([lab for _, lab in todo])
    print(f"accel bench distill ({mode}): {len(job.inputs)} samples (seed {recipe.inputs.seed}), 50-step Euler "
          f"reference, guidance {recipe.eval.reference.guidance_scale:g}")
    reference, ref_images = job.reference()
    job.report_resumption([lab for _, lab in todo])
    rows = [{**reference, "flops_speedup": 1.0, "wall_speedup": 1.0, **job.evaluator(ref_images, ref_images),
             "method": "reference (euler 50)", "cache": None, "adapter": None, "nfe": reference["nfe"] // 2,
             "model_calls": reference["nfe"]}]
    for config, lab in tqdm(todo, desc="distill", unit="config"):
        record, _ = job.measure(lab, split=False)
        rows.append(row(record, config, lab))
    mark_equal_flops_baselines(rows)
    report.write(rows, out_dir, json_path, mode, time.perf_counter() - started)
    return rows
