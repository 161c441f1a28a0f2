"""The interaction resolver: the interaction rules of docs/architecture.md, each a small named function.

A rule takes the stack and the run it is for (`RunInfo`: the model, its prediction type, the step
count, how guidance branches are evaluated) and returns the stack, adjusted or not, with the lines
that say what it decided and why; or it raises `StackError` naming both parts and the fix.
`resolve` runs every rule in order and returns a `ResolvedStack`, whose decisions are printed and
saved beside every result:

    resolved = resolve(stack, RunInfo("FluxTransformer2DModel", "transformer", "flow", num_steps=8))
    print(resolved.describe())
    # warmup-fraction: 0.25 -> 2 of 8 steps
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import samplers
from caching import RunSchedule
from caching.config import CacheConfig

from accel.adapter_files import TRAINED_FOR_KEYS, read_adapter_metadata, read_trained_for
from accel.resolve_parallel import context_parallel_decisions
from accel.resolve_trained import adapters_fuse_then_calibrate, adapters_trained_for, router_trained_for
from accel.stack import CachePlan, Stack, StackError

# Below this many steps a skipped step spans over a tenth of the trajectory: holding a whole step's
# output that long costs more quality than taking fewer steps saves, so whole-step reuse loses to
# the plain fewer-steps baseline of equal FLOPs. Block-level scopes still run head and tail blocks.
STEP_REUSE_MIN_STEPS = 10
# Below this many steps no cache can pay off: warm-up alone takes a step, and a skipped step spans
# a quarter of the trajectory or more (few-step distilled models).
CACHE_MIN_STEPS = 4
GUIDANCE_MODES = ("none", "separate", "batched")

__all__ = ["RunInfo", "ResolvedStack", "StackError", "RULES", "resolve", "read_trained_for",
           "read_adapter_metadata", "STEP_REUSE_MIN_STEPS", "CACHE_MIN_STEPS", "TRAINED_FOR_KEYS"]


@dataclass(frozen=True)
class RunInfo:
    """What a stack is resolved against.

    Attributes:
        model_class: the denoiser's class name (e.g. "FluxTransformer2DModel").
        model_kind: "transformer", "unet", or "other" (no caching layout).
        prediction_type: the raw model output: "flow", "epsilon", "v" or "x0".
        num_steps: solver steps of the run.
        guidance: how guidance branches are evaluated: "none" (cond only), "separate" (one call
            per branch) or "batched" (cond and uncond in one call).
        num_blocks: transformer blocks of the denoiser, when known.
        noise_family: "flow" or "vp"; None derives it from the prediction type.
        pipeline_class: the diffusers pipeline class, when there is one.
        supports_lora: whether adapters can be loaded.
        schedule: the walk the sampler takes, in words (e.g. "flow, shift 3.0 (from the
            pipeline's FlowMatchEulerDiscreteScheduler)"), when known.
        starts_mid_walk: the pipeline may start denoising part way along the walk (img2img and
            inpainting with strength < 1).
        context_parallel: ranks sharing the denoiser's tokens (diffusers context parallelism), 1
            without it.
        model_identity: the denoiser's weights identity (accel.lab.fingerprint.module_identity),
            when known; adapters that name the base model they were trained on are held to it.
    """

    model_class: str
    model_kind: str
    prediction_type: str
    num_steps: int
    guidance: str = "none"
    num_blocks: int | None = None
    noise_family: str | None = None
    pipeline_class: str | None = None
    supports_lora: bool = True
    schedule: str | None = None
    starts_mid_walk: bool = False
    context_parallel: int = 1
    model_identity: str | None = None

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_MODES:
            raise StackError(f"RunInfo.guidance: {self.guidance!r}; use one of {', '.join(GUIDANCE_MODES)}")

    @property
    def family(self) -> str:
        """The noise schedule family: given, or flow for flow predictions and vp otherwise."""
        if self.noise_family is not None:
            return self.noise_family
        return "flow" if self.prediction_type == "flow" else "vp"

    @property
    def owner(self) -> str:
        """The pipeline class, or the model class: how messages name the model."""
        return self.pipeline_class or self.model_class


@dataclass(frozen=True)
class ResolvedStack:
    """A stack adjusted for one run, with every decision the resolver made.

    Attributes:
        stack: the adjusted stack.
        run: what it was resolved against.
        decisions: one line per decision, e.g. "warmup-fraction: 0.25 -> 2 of 8 steps".
    """

    stack: Stack
    run: RunInfo
    decisions: tuple[str, ...] = field(default_factory=tuple)

    def cache_config(self) -> CacheConfig | None:
        """The caching.CacheConfig to install, or None."""
        return None if self.stack.cache is None else self.stack.cache.build()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the stack, the run, the decisions and the cache policy in full."""
        config = self.cache_config()
        return {"stack": self.stack.to_dict(), "run": asdict(self.run), "decisions": list(self.decisions),
                "cache_policy": None if config is None else config.describe()}

    def describe(self) -> str:
        """The stack, then one line per decision."""
        guidance = {"none": "no uncond pass", "separate": "cond and uncond calls",
                    "batched": "cond and uncond in one batched call"}[self.run.guidance]
        lines = [self.stack.describe(),
                 f"resolved for {self.run.owner}, {self.run.num_steps} steps, guidance: {guidance}:"]
        return "\n".join(lines + [f"  {line}" for line in self.decisions])

    def save(self, path: str | Path) -> Path:
        """Writes to_dict() as JSON to `path` (a file, or a folder receiving stack.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "stack.json"
        from accel.io import write_text

        return write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")


Decision = tuple[Stack, list[str]]
Rule = Callable[[Stack, RunInfo], Decision]


# ---------------------------------------------------------------------------------------- rules


def steps_match_run(stack: Stack, run: RunInfo) -> Decision:
    """The run takes the stack's step count: every other rule converts for that count."""
    if run.num_steps != stack.sampler.steps:
        raise StackError(f"sampler.steps={stack.sampler.steps} but the run takes {run.num_steps} steps; set "
                         f"sampler.steps={run.num_steps} or resolve for the steps that run")
    return stack, []


def prediction_fits_solver(stack: Stack, run: RunInfo) -> Decision:
    """The model's prediction type and noise family must fit the solver and the schedule."""
    sampler = stack.sampler
    try:
        sampler.spec.check_fits(run.prediction_type, run.family)
        if sampler.schedule != "auto":
            samplers.get_schedule(sampler.schedule).check_family(run.family)
    except ValueError as error:
        raise StackError(f"sampler {sampler.solver} / {sampler.schedule} on {run.owner} "
                         f"({run.prediction_type}, {run.family}): {str(error).splitlines()[0]}") from None
    lines = [f"prediction: {run.prediction_type} ({run.family}) fits {sampler.solver} on schedule "
             f"{sampler.schedule}; the scheduler converts it to x0"]
    if run.schedule is not None:
        lines.append(f"schedule: {sampler.schedule} -> {run.schedule}")
    return stack, lines


def mid_walk_start_needs_one_evaluation(stack: Stack, run: RunInfo) -> Decision:
    """img2img / inpainting start part way along the walk (strength < 1), which a solver with
    several model evaluations per step cannot do: say so now; such a call is refused when it runs."""
    if not run.starts_mid_walk:
        return stack, []
    spec = stack.sampler.spec
    if spec.supports_partial_start:
        return stack, [f"mid-walk-start: {run.owner} may start part way along the walk (strength < 1) -> "
                       f"{spec.name} starts there with a fresh history"]
    able = ", ".join(name for name, other in samplers.SOLVERS.items() if other.supports_partial_start)
    return stack, [f"mid-walk-start: {spec.name} takes {spec.evals_per_step} model evaluations per step and cannot "
                   f"start part way along the walk -> {run.owner} runs at strength 1 only (a call with strength < 1 "
                   f"is refused; for those use one of: {able})"]


def guidance_distilled(stack: Stack, run: RunInfo) -> Decision:
    """A guidance-distilled model has no uncond pass, so it gets no CFG and no uncond tricks."""
    guidance = stack.guidance
    if not guidance.distilled:
        return stack, []
    if run.guidance != "none":
        return stack, [f"guidance: the model is guidance-distilled, but this call runs classifier-free guidance as "
                       f"well ({run.guidance} cond / uncond calls, e.g. FLUX's true_cfg_scale) -> one cache state "
                       "per branch"]
    if guidance.uncond_interval > 1:
        raise StackError(f"guidance.distilled with guidance.uncond_interval={guidance.uncond_interval}: a "
                         "guidance-distilled model has no uncond pass to reuse; set guidance.uncond_interval=1")
    if guidance.scale != 1.0:
        raise StackError(f"guidance.distilled with guidance.scale={guidance.scale:g}: a guidance-distilled model "
                         "has no uncond pass for CFG; set guidance.scale=1 (pass its embedded guidance to the "
                         "pipeline call)")
    return stack, ["guidance: distilled -> one cond pass per step; no uncond tricks"]


def guidance_branches(stack: Stack, run: RunInfo) -> Decision:
    """Cache state is kept per guidance branch; uncond reuse needs separate branch calls."""
    guidance, lines = stack.guidance, []
    if guidance.uncond_interval > 1 and run.guidance == "none":
        stack = stack.replace(guidance=type(guidance)(guidance.scale, guidance.distilled, 1))
        lines.append(f"uncond-reuse: guidance.uncond_interval={guidance.uncond_interval} but no uncond pass "
                     "runs (scale 1) -> off")
    elif guidance.uncond_interval > 1 and run.guidance == "batched":
        raise StackError(f"guidance.uncond_interval={guidance.uncond_interval} on {run.owner}: it evaluates cond "
                         "and uncond in one batched call, so the uncond pass cannot be skipped alone; set "
                         "guidance.uncond_interval=1")
    elif guidance.uncond_interval > 1:
        lines.append(f"uncond-reuse: uncond computed every {guidance.uncond_interval} steps; in between, "
                     "cond + the last computed (uncond - cond)")
        if stack.cache is not None and "uncond" not in stack.cache.params.get("full_branches", ()):
            stack = stack.replace(cache=stack.cache.with_params(full_branches=["uncond"]))
            lines.append(f"uncond-reuse-vs-cache: the uncond branch is already computed only every "
                         f"{guidance.uncond_interval} steps; caching it as well would stack two reuses on it "
                         f"-> {stack.cache.preset} caches the cond branch only")
    if stack.cache is not None and run.guidance == "separate":
        lines.append("guidance-branches: cond and uncond are separate calls -> one cache state per branch")
    elif stack.cache is not None and run.guidance == "batched":
        lines.append("guidance-branches: cond and uncond in one batched call -> one cache state ('batched')")
    return stack, lines


def scope_fits_model(stack: Stack, run: RunInfo) -> Decision:
    """A cache scope must be one the model can provide (block scopes on transformers, deep branch on UNets)."""
    if stack.cache is None:
        return stack, []
    scope = stack.cache.build().scope
    if run.model_kind not in scope.model_kinds:
        fix = ("use preset deepcache for a UNet" if run.model_kind == "unet" else
               "use a transformer preset (fora, fbcache, dbcache, teacache, ...)" if run.model_kind == "transformer"
               else "register a caching layout for it, or drop the cache")
        raise StackError(f"cache {stack.cache.preset} (scope {scope.name}) on {run.model_class} "
                         f"(a {run.model_kind}): the model cannot provide this scope; {fix}")
    return stack, []


def step_reuse_needs_steps(stack: Stack, run: RunInfo) -> Decision:
    """Whole-step reuse below STEP_REUSE_MIN_STEPS switches to a block range, or is refused."""
    if stack.cache is None:
        return stack, []
    steps, cache = run.num_steps, stack.cache
    if steps < CACHE_MIN_STEPS:
        raise StackError(f"cache {cache.preset} at {steps} steps with {stack.sampler.solver}: below "
                         f"{CACHE_MIN_STEPS} steps no cache pays off (a skipped step spans over a quarter of "
                         "the trajectory); drop the cache (cache.preset=null)")
    if cache.build().scope.name != "residual" or steps >= STEP_REUSE_MIN_STEPS:
        return stack, []
    why = f"whole-step reuse ({cache.preset}) cannot pay off below {STEP_REUSE_MIN_STEPS} steps"
    fix = f"use >= {STEP_REUSE_MIN_STEPS} steps, a block-level preset (dbcache, fora, toca) or no cache"
    if run.num_blocks is not None and run.num_blocks < 3:
        raise StackError(f"cache {cache.preset} at {steps} steps: {why}, and {run.model_class} has "
                         f"{run.num_blocks} blocks, too few to keep a head and a tail block; {fix}")
    blocks = CachePlan(cache.preset, cache.params, {"kind": "blocks", "first": 1, "last": 1})
    try:
        blocks.build()
    except StackError as error:
        raise StackError(f"cache {cache.preset} at {steps} steps: {why}, and a block range does not fit it "
                         f"({error}); {fix}") from None
    return stack.replace(cache=blocks), [f"step-reuse: {why} ({steps} here) -> block scope: the first and "
                                         "the last block always run, the middle ones are cached"]


def multistep_needs_forecast(stack: Stack, run: RunInfo) -> Decision:
    """A multistep solver fed plainly reused outputs loses its history term: forecast instead
    (not for a learned router, whose gates were trained with plain reuse)."""
    if stack.cache is None or not stack.sampler.is_multistep or stack.cache.preset == "router":
        return stack, []
    if stack.cache.build().update.name != "reuse":
        return stack, []
    spec = stack.sampler.spec
    order = max(1, min(2, spec.order - 1))
    adjusted = stack.replace(cache=stack.cache.with_params(update="taylor", order=order))
    return adjusted, [f"multistep-forecast: {spec.name} (order {spec.order}, multistep) fed plain reuse would "
                      f"difference identical outputs -> {stack.cache.preset} update taylor, order {order}, on cached "
                      "steps"]


def trajectory_fractions(stack: Stack, run: RunInfo) -> Decision:
    """Warm-up, cool-down and max-cached fractions become step counts for this run; report them."""
    if stack.cache is None:
        return stack, []
    config, steps = stack.cache.build(), run.num_steps
    counts = RunSchedule.for_steps(config, steps)
    if counts.warmup_steps + counts.cooldown_steps >= steps:
        raise StackError(f"cache {stack.cache.preset} at {steps} steps: warm-up {counts.warmup_steps} + cool-down "
                         f"{counts.cooldown_steps} steps cover the whole run, so nothing is cached; lower "
                         "cache.params.warmup/cooldown, raise sampler.steps, or drop the cache")
    lines = []
    if config.warmup > 0:
        lines.append(f"warmup-fraction: {config.warmup:g} -> {counts.warmup_steps} of {steps} steps")
    if config.cooldown > 0:
        lines.append(f"cooldown-fraction: {config.cooldown:g} -> {counts.cooldown_steps} of {steps} steps")
    if config.max_cached is not None:
        exact = config.max_cached * steps
        note = f" ({exact:.2f} steps, raised to 1)" if math.floor(exact + 1e-9) < 1 else ""
        lines.append(f"max-cached-fraction: {config.max_cached:g} -> {counts.max_cached_steps} of {steps} steps "
                     f"in a row{note}")
    return stack, lines


RULES: tuple[Rule, ...] = (
    steps_match_run, prediction_fits_solver, mid_walk_start_needs_one_evaluation, adapters_trained_for,
    adapters_fuse_then_calibrate, guidance_distilled, guidance_branches, scope_fits_model, step_reuse_needs_steps,
    router_trained_for, multistep_needs_forecast, trajectory_fractions, context_parallel_decisions,
)


def resolve(stack: Stack, run: RunInfo, rules: tuple[Rule, ...] = RULES) -> ResolvedStack:
    """Runs every rule in order on `stack` for `run`.

    Returns:
        The adjusted stack and one line per decision.

    Raises:
        StackError: a combination that cannot work, naming both parts and the fix.
    """
    decisions: list[str] = []
    for rule in rules:
        stack, lines = rule(stack, run)
        decisions.extend(lines)
    return ResolvedStack(stack, run, tuple(decisions))
