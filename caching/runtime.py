"""The per-model cache runtime: reads the step context, keeps state per guidance branch, plans each call.

One `CacheRuntime` exists per `apply_cache`. A hook on the model itself (`CacheModelHook`) opens a
`CallFrame` at the start of every model call: it reads `step_context.current_step()` (never counting
calls), finds the state of the call's guidance branch (reset when the generation or the input
shapes change), converts the config's trajectory fractions for the run's step count, and decides
whether the cached scope is recomputed — at once for triggers that need only the step context,
or later, at the scope's decision point, for triggers that watch features. The scope hooks on
blocks read the frame. When the call returns, the frame commits the decision to the branch state
and to the statistics.

The per-call path is kept cheap and compile-friendly: the frame is a slotted object, the cache
memory statistic is measured lazily (`CacheStats.flush`), and the bookkeeping that reads the step
context, plans, decides and commits runs under `torch.compiler.disable`, so a compiled model
traces only its blocks and the hooks' plain branches on the frame's decision (one compiled
variant per computed / cached path, none per step). A decision from features taken while tracing
stays a tensor (`defer`): the block-range hooks pick their path with `torch.cond`, so no graph
break falls inside the model's block loop, and `close_call` reads it once.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch.utils.flop_counter import FlopCounterMode

from step_context import StepContext, current_step

from . import flops as _quantized_flop_formulas  # noqa: F401  (registers them)
from .calibration import Calibrator
from .config import CacheConfig, RunSchedule
from .frame import BranchState, CallFrame, input_signature, iter_tensors  # noqa: F401  (re-exported)
from .parallel import context_parallel_group
from .stats import CacheStats, FlopTable

logger = logging.getLogger("caching")


class CacheRuntime:
    """Per-model cache state and planning; see the module docstring.

    Args:
        config: the cache policy (a private copy, since calibration writes into its trigger).
        model_name: class name of the model, for messages.
    """

    def __init__(self, config: CacheConfig, model_name: str) -> None:
        self.config = config
        self.trigger = config.trigger
        self.model_name = model_name
        self.states: dict[str, BranchState] = {}
        self.generation: int | None = None
        self.frame: CallFrame | None = None
        self.stats = CacheStats()
        self.flop_tables: dict[tuple, FlopTable] = {}
        self.calibrator: Calibrator | None = None
        self.planners: list[Callable[[CallFrame], None]] = []
        # unit -> slot factory: slots every branch state starts with (a compiled model then never
        # sees a slot appear mid-generation, which would be one more guard and variant).
        self.slot_factories: dict[str, Callable[[], Any]] = {}
        self.group: Any = None  # context-parallel process group (caching.parallel), or None
        self._model: "weakref.ref[torch.nn.Module] | None" = None
        self.stats.measure_cache_bytes = self.cache_bytes
        self._schedules: dict[int, RunSchedule] = {}
        self._warned: set[str] = set()
        self.auto_calibrate = True
        self.defers = True  # feature-watching decisions stay in compiled graphs (`defer`)
        if self.trigger.needs_calibration:
            logger.warning("%s has no calibrated parameters; the first generation runs in full "
                           "to calibrate them (or call calibrate_%s beforehand)", self.trigger.name,
                           self.trigger.name)
            self.calibrator = Calibrator(self.trigger.name)

    def watch_parallelism(self, model: torch.nn.Module) -> None:
        """Reads `model`'s context-parallel group now and at the start of every generation (the
        user may enable parallelism after applying the cache)."""
        self._model = weakref.ref(model)
        self.group = context_parallel_group(model)

    # ------------------------------------------------------------------ planning a call
    def begin_call(self, args: tuple, kwargs: dict) -> CallFrame:
        """Opens the frame of a model call (see the module docstring)."""
        context = current_step()
        if context is None:
            self.warn_once("no-context", "no step context is published (step_context.publish_step); "
                           "computing every call in full")
            self.stats.passthrough_calls += 1
            return CallFrame()
        if context.generation != self.generation:
            self._sync_generation(context)
        signature = input_signature(args, kwargs)
        state = self._branch_state(context, signature)
        schedule = self._schedules.get(context.num_steps)
        if schedule is None:
            schedule = self._schedule(context.num_steps)
        frame = CallFrame(context, state, schedule, signature,
                          self.config.update.coordinate(context.step_index, context.sigma), self.group)
        self._plan(frame)
        for planner in self.planners:
            planner(frame)
        frame.measure_flops = (self.config.count_flops and frame.should_compute is not False
                               and signature not in self.flop_tables)
        return frame

    @torch.compiler.disable
    def open_call(self, args: tuple, kwargs: dict) -> CallFrame | None:
        """`begin_call`, made the frame of the call in progress; None for a nested call of the model.

        Runs eagerly under torch.compile (it reads the step context and plans in Python).
        """
        if self.frame is not None:  # a nested call of the same model: not a denoising step
            return None
        frame = self.frame = self.begin_call(args, kwargs)
        return frame

    @torch.compiler.disable
    def close_call(self, frame: CallFrame, output: Any) -> None:
        """Ends the call in progress and commits it (`end_call`); runs eagerly under torch.compile.

        A decision a compiled graph took (`frame.decision`) is read here: the step's one host sync.
        """
        self.frame = None
        if frame.decision is not None:
            frame.should_compute = bool(frame.decision)
            if not frame.should_compute:
                frame.skipped.extend(frame.skipped_if_cached)
        self.end_call(frame, output)

    @torch.compiler.disable
    def abandon_call(self) -> None:
        """Forgets the call in progress after its forward raised."""
        self.frame = None

    @torch.compiler.disable
    def eager_call(self, frame: CallFrame, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Runs the model's forward eagerly: under FlopCounterMode on the first computed call of a
        signature, and while calibrating (the calibrator reads features in Python mid-forward)."""
        if not frame.measure_flops:
            return forward(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            output = forward(*args, **kwargs)
        frame.total_flops = counter.get_total_flops()
        return output

    def _plan(self, frame: CallFrame) -> None:
        context, state, schedule = frame.context, frame.state, frame.schedule
        is_followup_stage = context.stage > 0
        frame.record = not is_followup_stage
        if is_followup_stage:
            frame.should_compute = state.decisions.get(context.step_index, True)
            frame.must_compute = frame.should_compute
            return
        is_warmup_phase = schedule.is_warmup_phase(context.step_index)
        is_cooldown_phase = schedule.is_cooldown_phase(context.step_index)
        is_forced_refresh = (schedule.max_cached_steps is not None
                             and state.consecutive_cached >= schedule.max_cached_steps)
        is_cache_empty = not state.has_cache
        is_calibrating = self.calibrator is not None
        is_full_branch = context.branch in self.config.full_branches
        frame.must_compute = (is_warmup_phase or is_cooldown_phase or is_forced_refresh
                              or is_cache_empty or is_calibrating or is_full_branch)
        if self.trigger.signal is not None:
            frame.should_compute = None  # decided at the scope's decision point, from features
        elif frame.must_compute:
            frame.should_compute = True
        else:
            frame.should_compute = bool(self.trigger.wants_compute(state.trigger, frame, None))

    @torch.compiler.disable
    def decide(self, frame: CallFrame, signal: Any) -> bool:
        """The decision of a feature-watching trigger, given its signal (probe or head residual)."""
        if frame.should_compute is not None:
            return frame.should_compute
        if self.calibrator is not None:
            self.calibrator.note_signal(frame, signal)
            frame.should_compute = True
            return True
        wants = self.trigger.wants_compute(frame.state.trigger, frame, signal)
        frame.should_compute = bool(frame.must_compute or wants)
        return frame.should_compute

    def can_defer(self, frame: CallFrame) -> bool:
        """Whether a feature-watching decision can stay in a compiled graph (`defer`): while tracing,
        with plain reuse, on one rank. (A graph break inside the model's block loop cannot be resumed:
        dynamo would run the model's whole forward eagerly from then on, every block compiled apart.)"""
        return (self.defers and torch.compiler.is_compiling() and frame.group is None
                and self.config.update.name == "reuse")

    def defer(self, frame: CallFrame, signal: Any) -> None:
        """`decide` inside a compiled graph: the trigger's decision stays a tensor (`frame.decision`)
        and each block of the range takes its path with `torch.cond`; `close_call` reads it. When
        warm-up or the like computes anyway, the trigger only records its signal."""
        if frame.must_compute:
            self.trigger.observe(frame.state.trigger, frame, signal)
            frame.should_compute = True
            return
        wants = self.trigger.wants_compute(frame.state.trigger, frame, signal)
        if isinstance(wants, torch.Tensor):
            frame.decision = wants
        else:
            frame.should_compute = bool(wants)

    # ------------------------------------------------------------------ finishing a call
    def end_call(self, frame: CallFrame, output: Any) -> None:
        """Commits the call's decision to the branch state and records its statistics."""
        if frame.is_passthrough:
            return
        computed = frame.compute_now
        state, step = frame.state, frame.context.step_index
        if frame.record:
            state.decisions[step] = computed
            if self.calibrator is None:
                self.trigger.commit(state.trigger, frame, computed)
            if computed:
                state.last_computed_step, state.consecutive_cached, state.has_cache = step, 0, True
            else:
                state.consecutive_cached += 1
        if self.calibrator is not None:
            self.calibrator.note_output(frame, output)
        if frame.measure_flops and frame.total_flops is not None:
            self.flop_tables[frame.signature] = FlopTable(frame.total_flops, dict(frame.unit_flops),
                                                          frame.overhead_flops)
        self.stats.record_call(frame, computed, self.flop_tables.get(frame.signature))

    # ------------------------------------------------------------------ helpers for scope hooks
    def run_unit(self, frame: CallFrame, unit: str, fn: Callable, *args, **kwargs) -> Any:
        """Runs a unit's original forward, measuring its FLOPs during a measuring call."""
        if not frame.measure_flops:
            return fn(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            output = fn(*args, **kwargs)
        frame.unit_flops[unit] = frame.unit_flops.get(unit, 0) + counter.get_total_flops()
        return output

    def run_overhead(self, frame: CallFrame, fn: Callable, *args, **kwargs) -> Any:
        """Runs an indicator computation (a probe), measuring its FLOPs during a measuring call."""
        if not frame.measure_flops:
            return fn(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            output = fn(*args, **kwargs)
        frame.overhead_flops += counter.get_total_flops()
        return output

    def slot(self, frame: CallFrame, key: str, factory: Callable[[], Any]) -> Any:
        """The branch's cached data for `key`, created by `factory` on first use."""
        slots = frame.state.slots
        found = slots.get(key)
        if found is None:
            found = slots[key] = factory()
        return found

    def note_quantity(self, frame: CallFrame, value: torch.Tensor) -> None:
        """Offers a freshly computed cached quantity to calibration (magnitude ratios)."""
        if self.calibrator is not None and frame.record:
            self._note_quantity(frame, value)

    @torch.compiler.disable
    def _note_quantity(self, frame: CallFrame, value: torch.Tensor) -> None:
        self.calibrator.note_quantity(frame, value)

    def cache_bytes(self) -> int:
        """Bytes of tensor storage held by all branch states (shared storages counted once)."""
        seen: dict[int, int] = {}
        for state in self.states.values():
            for tensor in iter_tensors([state.trigger, state.slots]):
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def finish_calibration(self):
        """Fits the trigger's parameters from what calibration recorded; returns the calibration."""
        if self.calibrator is None:
            return None
        calibration = self.calibrator.finish(self.trigger)
        self.trigger.calibrate(calibration)
        self.calibrator = None
        logger.info("calibrated %s on %s: %s", self.trigger.name, self.model_name, calibration)
        return calibration

    # ------------------------------------------------------------------ state bookkeeping
    def _sync_generation(self, context: StepContext) -> None:
        if context.generation == self.generation:
            return
        self.stats.flush()  # the ending run's cache memory, before its states go
        if self.auto_calibrate and self.calibrator is not None and self.calibrator.has_data:
            try:
                self.finish_calibration()
            except ValueError as error:  # too little recorded yet: keep calibrating
                logger.warning("%s; calibrating on the next generation too", error)
        self.states.clear()
        self.generation = context.generation
        self.stats.begin_run(context.generation)
        model = self._model() if self._model is not None else None
        if model is not None:
            self.group = context_parallel_group(model)

    def _branch_state(self, context: StepContext, signature: tuple) -> BranchState:
        state = self.states.get(context.branch)
        is_new_shape = state is not None and state.signature != signature
        is_rewound = state is not None and context.stage == 0 and context.step_index < state.last_step
        if is_rewound:
            self.warn_once("rewound", "step index went back within generation %s without a new "
                           "generation id; resetting the cache (drivers should call new_generation())",
                           context.generation)
        if state is None or is_new_shape or is_rewound:
            if state is not None:
                self.stats.flush()
            state = BranchState(signature=signature, trigger=self.trigger.new_state(),
                                slots={key: factory() for key, factory in self.slot_factories.items()})
            self.states[context.branch] = state
        if context.stage == 0:
            state.last_step = context.step_index
        return state

    def _schedule(self, num_steps: int) -> RunSchedule:
        if num_steps not in self._schedules:
            self._schedules[num_steps] = RunSchedule.for_steps(self.config, num_steps)
        return self._schedules[num_steps]


class CacheModelHook(ModelHook):
    """Hook on the model itself: opens and closes the call frame around every forward."""

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime, forward = self.runtime, self.fn_ref.original_forward
        frame = runtime.open_call(args, kwargs)
        if frame is None:
            return forward(*args, **kwargs)
        try:
            if frame.measure_flops or runtime.calibrator is not None:
                output = runtime.eager_call(frame, forward, args, kwargs)
            else:
                output = self._forward(frame, forward, args, kwargs)
        except BaseException:
            runtime.abandon_call()
            raise
        runtime.close_call(frame, output)
        return output

    @torch.compiler.disable(recursive=False)
    def _forward(self, frame: CallFrame, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """The model's forward, compiled as a frame of its own under torch.compile (this function runs
        eagerly, so that it can catch what compiling raises): if a block cannot be traced inside
        `torch.cond` (a deferred decision), decisions break the graph from then on (logged once)
        and the forward is compiled again."""
        try:
            return forward(*args, **kwargs)
        except torch._dynamo.exc.UncapturedHigherOrderOpError as error:
            runtime = self.runtime
            if not runtime.defers:
                raise
            runtime.defers = False
            logger.warning("torch.compile cannot trace %s's cached blocks inside torch.cond (%s); the cache's "
                           "decisions break the graph instead (the model's forward then runs eagerly, its blocks "
                           "compiled apart)", runtime.model_name, _compile_error_reason(error))
            frame.decision, frame.should_compute = None, None
            frame.skipped_if_cached = ()
            return forward(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.stats.flush()
        self.runtime.states.clear()
        return module


def _compile_error_reason(error: Exception) -> str:
    """The line of a dynamo error that says what could not be traced (its first line says only that)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines[:-1]):
        if line.endswith("Got graph break/error:"):
            return lines[index + 1]
    return lines[0] if lines else type(error).__name__
