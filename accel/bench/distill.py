"""`accel bench distill [--quick] [--json PATH]`: the shipped adapters and router against plain
solvers and caches, in one run on the embedded flow model.

Every configuration samples the same seeded noise and labels, through the same code as `accel
run` (recipes with overrides, adapters loaded with diffusers' LoRA loader, caches installed by
the resolver), and is measured against the 50-step Euler reference with guidance 4 of the same
seeds: FLOPs counted by torch (`flops_speedup` = reference FLOPs / FLOPs), PSNR, SSIM, FD to real
digits in the judge's features and the judge's accuracy. Records carry `nfe` (solver evaluations
per guidance branch), `model_calls` (NFE times the guidance passes), `cache` (a preset name or
null) and `adapter` (null, "step", "cache-aware" or "router").

The shipped adapters (`embedded:adapters/<name>`, in the package's accel/embedded/weights/adapters/,
trained by `accel train train/...`) are named in the overrides like any recipe's; a missing one is
skipped with a note. Outputs under out_dir: distill.json, distill.md,
distill.png (FLOPs speedup vs PSNR) and distill-<mode>.jsonl (finished records a rerun skips).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from accel import io
from accel.bench import _distill_report as report
from accel.data_files import embedded_name
from accel.embedded.model import WEIGHTS_DIR
from accel.execute import (Evaluator, add_speedups, build_inputs, load_embedded_model, measure_plan, measure_stack,
                           model_device,
                           plan_from, reference_denoiser, reference_guidance)
from accel.recipe import load_recipe
from accel.adapter_files import read_adapter_metadata

ADAPTERS_DIR = WEIGHTS_DIR / "adapters"
DISTILLED = ["guidance.scale=1.0", "guidance.distilled=true"]
# The uncond branch computed every 2nd step, (uncond - cond) reused in between (FasterCache's CFG
# reuse, samplers.cfg_model_fn): a cache over the guidance branch rather than over features.
CFG_REUSE = "cfg-reuse"
# Step-distillation adapters trained with CFG uncond reuse on (objective.params.student_uncond_interval).
REUSE_TRAINED = ("step-4-cfg-reuse",)


@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        label: row name.
        overrides: recipe overrides on embedded-demo.
        cache: the cache preset (None: no cache).
        adapter: None, "step", "cache-aware" or "router".
        needs: files under ADAPTERS_DIR it needs (skipped when absent).
    """

    label: str
    overrides: tuple[str, ...]
    cache: str | None = None
    adapter: str | None = None
    needs: tuple[str, ...] = ()


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
    """Overrides for the guidance an adapter was trained with (distilled: one cond pass a step)."""
    trained = meta.get("accel.guidance", "distilled")
    return tuple(DISTILLED) if trained == "distilled" else (f"guidance.scale={float(trained)}",)


def configurations(quick: bool) -> list[Config]:
    """Plain solvers at the adapters' NFE, the adapters, the cache without and with its adapter, the router."""
    out = []
    for steps in (4, 8):
        for solver in ("euler", "dpmpp_2m", "unipc_bh2"):
            out.append(Config(f"{solver} {steps}", (f"sampler.solver={solver}", f"sampler.steps={steps}")))
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


def fingerprint(quick: bool) -> str:
    """Hash of the shipped adapters, the base weights and the mode: journal records of another are redone."""
    digest = hashlib.sha256(str(quick).encode())
    for path in sorted(WEIGHTS_DIR.rglob("*.safetensors")):
        if "checkpoint" not in path.parts[-2]:
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def base_recipe(quick: bool, overrides: tuple[str, ...] = ()):
    """embedded-demo with the bench's inputs: quick 10 x 4 samples (seed 0), full 10 x 10 (seed 1)."""
    inputs = ["inputs.samples_per_class=4", "inputs.seed=0", "eval.timing_batch=10", "eval.timing_repeats=1"] \
        if quick else ["inputs.samples_per_class=10", "inputs.seed=1", "eval.timing_batch=20", "eval.timing_repeats=3"]
    base = ["sampler.solver=euler", "sampler.schedule=flow", "cache.preset=null", "output.dir=runs/bench-distill"]
    return load_recipe("embedded-demo", [*inputs, *base, *overrides])


def _record(config: Config, record: dict, steps_passes: float) -> dict:
    stack = record.pop("stack", None)
    record.update({"method": config.label, "cache": config.cache, "adapter": config.adapter,
                   "model_calls": record["nfe"], "nfe": int(round(record["nfe"] / steps_passes)),
                   "resolved": (stack or {}).get("decisions")})
    return record


def run(quick: bool, json_path: Path | None, out_dir: Path) -> list[dict]:
    """Measures every configuration (resuming finished ones); returns the records, reference first."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else "full"
    recipe = base_recipe(quick)
    model = load_embedded_model(recipe.model.name, model_device(recipe))
    inputs = build_inputs(recipe)
    evaluate = Evaluator(recipe, inputs.labels)
    print(f"accel bench distill ({mode}): {len(inputs.labels)} samples (seed {recipe.inputs.seed}), 50-step Euler "
          f"reference, guidance {reference_guidance(recipe):g}, {torch.get_num_threads()} threads")
    reference, ref_images = measure_plan("reference", "reference", plan_from(recipe.eval.reference),
                                         reference_denoiser(recipe, model), inputs, recipe, split=False,
                                         guidance_scale=reference_guidance(recipe))
    add_speedups(reference, reference).update(evaluate(ref_images, ref_images))
    records = [{**reference, "method": "reference (euler 50)", "cache": None, "adapter": None,
                "model_calls": reference["nfe"], "nfe": reference["nfe"] // 2}]
    journal = out_dir / f"distill-{mode}.jsonl"
    key = fingerprint(quick)
    done = {(r["method"], tuple(r["overrides"])): r for r in io.read_jsonl(journal)
            if r.get("fingerprint") == key and "overrides" in r and "method" in r}
    todo = configurations(quick)
    for config in tqdm(todo, desc="distill", unit="config"):
        missing = [n for n in config.needs if not (ADAPTERS_DIR / n).exists()]
        if missing:
            print(f"skipped {config.label}: no {', '.join(missing)} under {ADAPTERS_DIR} (train it first)")
            continue
        if (config.label, config.overrides) in done:  # speedups against this run's reference
            records.append(add_speedups(done[config.label, config.overrides], reference))
            continue
        cell = base_recipe(quick, config.overrides)
        record, images = measure_stack(config.label, cell, model, inputs, split=False)
        add_speedups(record, reference).update(evaluate(images, ref_images))
        record = {**_record(config, record, 1.0 if cell.guidance.scale == 1.0 else 2.0), "fingerprint": key,
                  "overrides": list(config.overrides)}
        io.append_jsonl(journal, record, default=str)
        records.append(record)
    report.write(records, out_dir, json_path, mode, time.perf_counter() - started)
    return records
