"""The resolver rules for trained parts (`adapter-trained-for`, `adapter-order`, `router-trained-for`),
beside accel/resolve.py's rules: a LoRA adapter or a learned router runs only with what it was
trained for, and adapters load before the cache so that calibration sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from accel.adapter_files import (BASE_MODEL_KEY, TRAINED_FOR_RECIPE_KEYS, adapter_file, read_adapter_metadata,
                                 read_trained_for)
from accel.stack import Stack, StackError

if TYPE_CHECKING:
    from accel.resolve import RunInfo

Decision = tuple[Stack, list[str]]


def _base_model_line(path: str, run: "RunInfo") -> str | None:
    """Refuses an adapter trained on other base weights than the run's denoiser; the match, in words."""
    base = read_adapter_metadata(path).get(BASE_MODEL_KEY)
    if base is None or run.model_identity is None:
        return None
    if base != run.model_identity:
        raise StackError(f"adapter {path} was trained on base model weights {base}, but {run.owner}'s "
                         f"{run.model_class} is {run.model_identity} (another model, or the same in another "
                         "dtype); use the adapter with the model it was trained on or train one for this model "
                         "(`accel train`)")
    return f"base model {base} matches"


def adapters_trained_for(stack: Stack, run: "RunInfo") -> Decision:
    """An adapter that names the (solver, steps, cache, uncond reuse) it was trained for runs only with
    those, and one that names its base model's weights identity only on that model."""
    lines = []
    cache = stack.cache.preset if stack.cache is not None else "none"
    actual = {"solver": stack.sampler.solver, "steps": str(run.num_steps), "cache": cache,
              "uncond_interval": str(stack.guidance.uncond_interval)}
    for adapter in stack.adapters:
        base = _base_model_line(adapter.path, run)
        trained = read_trained_for(adapter.path)
        if not trained:
            if base is not None:
                lines.append(f"adapter-trained-for: {adapter_file(adapter.path).name}: {base}")
            continue
        wanted = ", ".join(f"{k}={v}" for k, v in trained.items())
        mismatched = [k for k, v in trained.items() if actual[k] != v]
        if mismatched:
            have = ", ".join(f"{k}={actual[k]}" for k in trained)
            fix = ", ".join(f"{TRAINED_FOR_RECIPE_KEYS[k]}={trained[k]}" for k in mismatched)
            raise StackError(f"adapter {adapter.path} was trained for {wanted}, but the stack gives {have}; "
                             f"set {fix} or use an adapter trained for this stack")
        tail = f"; {base}" if base is not None else ""
        lines.append(f"adapter-trained-for: {adapter_file(adapter.path).name} trained for {wanted} -> matches{tail}")
    return stack, lines


def adapters_fuse_then_calibrate(stack: Stack, run: "RunInfo") -> Decision:
    """Adapters load (and fuse) before the cache is installed, so calibration sees them."""
    if not stack.adapters:
        return stack, []
    if not run.supports_lora:
        raise StackError(f"adapters on {run.owner}: this pipeline cannot load LoRA weights "
                         "(no load_lora_weights); drop the adapters or use a pipeline with LoRA support")
    fused = {adapter.fuse for adapter in stack.adapters}
    if len(fused) > 1:
        raise StackError("adapters: some have fuse=true and some fuse=false, but PEFT skips unfused adapters "
                         "once any adapter of a layer is fused; set the same fuse for all adapters")
    names = ", ".join(adapter_file(a.path).name for a in stack.adapters)
    action = "fuse" if stack.adapters[0].fuse else "activate"
    if stack.cache is None:
        return stack, [f"adapter-order: load {names} -> {action}"]
    trigger = stack.cache.build().trigger
    if trigger.needs_calibration:
        tail = f"{trigger.name} calibrates on the first generation, with the adapters {action}d"
    elif trigger.name in ("teacache", "magcache"):
        tail = (f"{trigger.name} parameters were given: they must have been fitted with these adapters "
                f"{action}d (leave them null to calibrate here)")
    else:
        tail = f"{trigger.name} needs no calibration"
    return stack, [f"adapter-order: load {names} -> {action} -> install {stack.cache.preset}; {tail}"]


def router_trained_for(stack: Stack, run: "RunInfo") -> Decision:
    """A learned router runs only with the solver and step count it was trained for."""
    if stack.cache is None or stack.cache.preset != "router":
        return stack, []
    import caching

    path = stack.cache.params.get("path")
    if not path:
        raise StackError("cache router: no router file; set cache.params.path to a router .safetensors "
                         "(trained with `accel train`)")
    try:
        spec = caching.load_router(path)
    except (OSError, ValueError) as error:
        raise StackError(f"cache router: {error}") from None
    wanted = {"solver": spec.solver, "steps": spec.num_steps}
    have = {"solver": stack.sampler.solver, "steps": run.num_steps}
    mismatched = [k for k, v in wanted.items() if v is not None and have[k] != v]
    if mismatched:
        raise StackError(f"cache router {path} was trained for solver={spec.solver}, steps={spec.num_steps}, but the "
                         f"sampler gives solver={have['solver']}, steps={have['steps']}; set "
                         + ", ".join(f"sampler.{k}={wanted[k]}" for k in mismatched) + " or train a router for this "
                         "sampler")
    computed = spec.computed_fraction(stack.cache.params.get("threshold"))
    return stack, [f"router-trained-for: {Path(path).name} trained for {spec.solver} {spec.num_steps} steps -> "
                   f"matches; {computed:.0%} of block evaluations computed, reuse (no forecast: it was trained "
                   "with reuse)"]
