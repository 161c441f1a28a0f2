"""The Stack: sampler x cache x adapters x guidance, as typed data (docs/architecture.md, "Stack, resolver,
apply / remove").

A `Stack` names what to run, by registry names only (a solver from `samplers.SOLVERS`, a preset
from `caching.PRESETS`), so it can be printed, saved beside a result and rebuilt from a recipe.
It does not know the model: `accel.resolve.resolve(stack, run_info)` adjusts it for one model and
step count, and `accel.apply(pipe, stack)` installs the resolved stack on a diffusers pipeline.

    stack = Stack(SamplerPlan("dpmpp_2m", 8), CachePlan("fora", {"interval": 2}))
    stack = Stack.from_recipe(load_recipe("embedded-demo"))
    print(stack.describe())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import caching
import samplers
from accel.data_files import DataFileError, resolve_data_file
from caching import BlockRangeScope, CacheConfig

# Scope overrides a resolver rule may put on a preset, by name (recipes never name Python paths).
SCOPE_OVERRIDES = {"blocks": BlockRangeScope}


class StackError(ValueError):
    """A stack that cannot work; the message is one line naming both parts and the fix."""


def _plain(value: Any) -> Any:
    """OmegaConf containers (and nested mappings) as plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _optimized_walk(path: Any) -> Path:
    """An optimised schedule file: `embedded:<model>/schedules/<file>.json` (shipped inside the
    package) or a path relative to the working directory (accel.data_files.resolve_data_file)."""
    if not path:
        raise StackError("sampler.schedule_params.path: schedule optimized needs the JSON file of the walk "
                         "(made by samplers.optimized.optimize_schedule or `accel bench samplers`)")
    found = _data_file("sampler.schedule_params.path", path, "optimised schedule",
                       "make it with samplers.optimized.optimize_schedule(...).save(path) or `accel bench samplers`")
    if not found.is_file():
        raise StackError(f"sampler.schedule_params.path: {path} is a folder; name the walk's JSON file in it")
    return found


def _data_file(key: str, name: Any, what: str, how: str) -> Path:
    """resolve_data_file, its error as a StackError."""
    try:
        return resolve_data_file(str(name), key=key, what=what, how=how)
    except DataFileError as error:
        raise StackError(str(error)) from None


@dataclass(frozen=True)
class SamplerPlan:
    """The solver, its step count and schedule.

    Attributes:
        solver: a name in samplers.SOLVERS.
        steps: solver steps N (NFE = the solver's nfe(N) per guidance branch).
        schedule: a name in samplers.SCHEDULES, or "auto" (the pipeline scheduler's own family
            default: FLUX's dynamic shift, SD3's static shift, Karras for VP models).
        schedule_params: keyword options of the schedule function.
        solver_params: keyword options of the solver (e.g. {"eta": 0.5} for ddim).
    """

    solver: str = "dpmpp_2m"
    steps: int = 8
    schedule: str = "auto"
    schedule_params: Mapping[str, Any] = field(default_factory=dict)
    solver_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.solver not in samplers.SOLVERS:
            raise StackError(f"sampler.solver: unknown solver {self.solver!r}; choose one of "
                             f"{', '.join(sorted(samplers.SOLVERS))}")
        if self.schedule != "auto" and self.schedule not in samplers.SCHEDULES:
            raise StackError(f"sampler.schedule: unknown schedule {self.schedule!r}; choose auto or one of "
                             f"{', '.join(sorted(samplers.SCHEDULES))}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise StackError(f"sampler.steps: {self.steps!r} must be an integer >= 1")
        object.__setattr__(self, "schedule_params", dict(_plain(self.schedule_params)))
        object.__setattr__(self, "solver_params", dict(_plain(self.solver_params)))
        if self.schedule == "optimized":
            self.schedule_params["path"] = str(_optimized_walk(self.schedule_params.get("path")))

    @property
    def spec(self) -> samplers.SolverSpec:
        """The solver's registry entry (order, evaluations per step)."""
        return samplers.get_solver(self.solver)

    @property
    def is_multistep(self) -> bool:
        """True for solvers whose order comes from earlier outputs (2M, 3M, UniPC, iPNDM)."""
        return self.spec.evals_per_step == 1 and self.spec.order > 1

    def describe(self) -> str:
        params = {**self.schedule_params, **self.solver_params}
        extra = f" ({_format_params(params)})" if params else ""
        return f"{self.solver}, {self.steps} steps, schedule {self.schedule}{extra}"


@dataclass(frozen=True)
class CachePlan:
    """A cache preset, its parameters and an optional scope override chosen by the resolver.

    Attributes:
        preset: a name in caching.PRESETS.
        params: the preset's parameters (see caching.preset_parameters(preset)).
        scope: None (the preset's scope), or {"kind": "blocks", "first": n, "last": m}.
    """

    preset: str
    params: Mapping[str, Any] = field(default_factory=dict)
    scope: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(_plain(self.params)))
        if self.scope is not None:
            object.__setattr__(self, "scope", dict(_plain(self.scope)))
        if self.preset == "router" and self.params.get("path"):
            self.params["path"] = str(_data_file("cache.params.path", self.params["path"], "router file",
                                                 "train one with `accel train train/router`"))
        self.build()  # validates names, parameters and ranges now, as a StackError

    def build(self) -> CacheConfig:
        """The caching.CacheConfig of this plan.

        Raises:
            StackError: unknown preset, parameter or scope, or a value out of range.
        """
        try:
            config = caching.get_preset(self.preset, **self.params)
            if self.scope is not None:
                scope = dict(self.scope)
                kind = scope.pop("kind", None)
                if kind not in SCOPE_OVERRIDES:
                    raise ValueError(f"scope override kind {kind!r} is unknown; use one of "
                                     f"{', '.join(SCOPE_OVERRIDES)}")
                config = dataclasses.replace(config, scope=SCOPE_OVERRIDES[kind](**scope))
        except (TypeError, ValueError) as error:
            raise StackError(f"cache {self.preset}: {str(error).splitlines()[0]}") from None
        return config

    def with_params(self, **changes: Any) -> "CachePlan":
        """A copy with `changes` merged into the parameters."""
        return dataclasses.replace(self, params={**self.params, **changes})

    def describe(self) -> str:
        text = self.preset + (f" ({_format_params(self.params)})" if self.params else "")
        if self.scope is not None:
            text += f", scope {_format_params(self.scope)}"
        return text


@dataclass(frozen=True)
class AdapterPlan:
    """One LoRA adapter in diffusers format.

    Attributes:
        path: a .safetensors file, or a folder holding one.
        scale: the LoRA scale.
        fuse: fuse into the weights (before any cache calibration).
    """

    path: str
    scale: float = 1.0
    fuse: bool = False

    def describe(self) -> str:
        return f"{self.path} x{self.scale:g}" + (" fused" if self.fuse else "")


@dataclass(frozen=True)
class GuidancePlan:
    """Classifier-free guidance as the stack assumes it.

    Attributes:
        scale: the CFG scale the pipeline is called with (1: cond branch only).
        distilled: a guidance-distilled model: no uncond pass exists.
        uncond_interval: compute the uncond branch every this many steps and reuse its offset from
            the cond branch in between (1: always compute). Needs separate cond / uncond calls.
    """

    scale: float = 1.0
    distilled: bool = False
    uncond_interval: int = 1

    def __post_init__(self) -> None:
        if not self.scale >= 1.0:
            raise StackError(f"guidance.scale: {self.scale} must be >= 1 (1 disables CFG)")
        if isinstance(self.uncond_interval, bool) or not isinstance(self.uncond_interval, int) \
                or self.uncond_interval < 1:
            raise StackError(f"guidance.uncond_interval: {self.uncond_interval!r} must be an integer >= 1 "
                             "(1 computes the uncond branch every step)")

    @property
    def has_uncond_pass(self) -> bool:
        """Whether the model is evaluated on an uncond branch at all."""
        return not self.distilled and self.scale > 1.0

    def describe(self) -> str:
        if self.distilled:
            return "guidance-distilled (no uncond pass)"
        text = f"scale {self.scale:g}" + ("" if self.scale > 1.0 else " (cond only)")
        return text + (f", uncond every {self.uncond_interval} steps" if self.uncond_interval > 1 else "")


@dataclass(frozen=True)
class Stack:
    """Sampler, cache, adapters and guidance: everything that makes a run cheaper.

    Attributes:
        sampler: solver, steps and schedule.
        cache: the cache plan, or None for no cache.
        adapters: LoRA adapters, loaded in order.
        guidance: CFG as the stack assumes it.
    """

    sampler: SamplerPlan = field(default_factory=SamplerPlan)
    cache: CachePlan | None = None
    adapters: tuple[AdapterPlan, ...] = ()
    guidance: GuidancePlan = field(default_factory=GuidancePlan)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Stack":
        """The stack a recipe (accel.recipe schema, a DictConfig) names.

        Reads sampler.{solver, steps, schedule, schedule_params, solver_params},
        cache.{preset, params}, adapters[].{path, scale, fuse} and guidance.{scale, distilled}
        (and guidance.uncond_interval where the recipe has it).
        """
        sampler, cache, guidance = recipe.sampler, recipe.cache, recipe.guidance
        plan = SamplerPlan(solver=str(sampler.solver), steps=int(sampler.steps), schedule=str(sampler.schedule),
                           schedule_params=_plain(sampler.schedule_params),
                           solver_params=_plain(sampler.solver_params))
        cache_plan = None if cache.preset is None else CachePlan(str(cache.preset), _plain(cache.params))
        adapters = tuple(AdapterPlan(str(a.path), float(a.scale), bool(a.fuse)) for a in recipe.adapters)
        interval = guidance.get("uncond_interval", 1) if hasattr(guidance, "get") else 1
        return cls(plan, cache_plan, adapters,
                   GuidancePlan(float(guidance.scale), bool(guidance.distilled), int(interval)))

    def replace(self, **changes: Any) -> "Stack":
        """A copy with some parts replaced (resolver rules use it)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Four lines: sampler, cache, adapters, guidance."""
        adapters = "; ".join(a.describe() for a in self.adapters) or "none"
        cache = self.cache.describe() if self.cache is not None else "none"
        return "\n".join([f"sampler   {self.sampler.describe()}", f"cache     {cache}",
                          f"adapters  {adapters}", f"guidance  {self.guidance.describe()}"])
